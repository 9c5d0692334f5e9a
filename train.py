"""
Train SegFormer, DepthFormer, SegDepthFormer or a Deep Sub-Ensemble (paper Sections 3.2 and 4).
This file is the training loop; distill.py trains EMUFormer (Section 3.3) with the same loop
and its own step.

Each data set has its recipe (RECIPES), printed at the start; a flag overrides any part of it.
    synthetic    the CPU demo: a B0 from scratch, lr 6e-4, 24 epochs, minutes on 2 cores
    nyuv2        the paper: B2, lr 6e-5, 100 epochs
    cityscapes   the paper: B2, lr 6e-5, 250 epochs
Common to all, the paper's: AdamW, weight decay 0.01, the polynomial decay of Eq. 12 (power
0.9), a global batch of 8, the loss of Eq. 7 with w1 = 1, and the augmentations of data.py. A
Deep Sub-Ensemble trains one head per step, alternating. A Deep Ensemble is N runs of this
script with different --seed.

    # the CPU demo: a B0 SegDepthFormer on the synthetic scenes
    python train.py
    # the paper: NYUv2 from ImageNet weights, one GPU or four
    python train.py --data nyuv2 --root data/nyuv2 --model segdepthformer \
        --pretrained mit_b2.pth --out runs/sdf_b2
    torchrun --nproc_per_node=4 train.py --data nyuv2 --root data/nyuv2 ... (the same flags)
    # several machines: torchrun's rendezvous, nothing home-made
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py ...
    # a killed or interrupted run continues exactly where its last checkpoint left it
    python train.py ... --out runs/sdf_b2 --resume

The loop, in nanoGPT's order: this_process (ranks, device, precision; the shared pieces are in
plumbing.py), then a Loop, which builds the data and the model (build_network), resumes, and
hands out the batches; the caller takes each step (train_step here, distill.py its own) and
gives the Loop its loss terms, which logs them every --log-every steps, validates at the end
of every --eval-every epochs and saves the checkpoints.

Reproducibility: the model's initialisation follows --seed, every sample's augmentation is
drawn from its own seed (seed, epoch, index) on one thread, and the order of the samples from
(seed, epoch). So a run gives the same batches, to the bit, whatever the number of data
workers or ranks, and --resume continues mid-epoch with the very batches, weights, optimizer
moments, log window and random state it would have had (exactly, on the CPU; cuDNN and atomics
can differ in the last bits on a GPU), for the flags --resume may change too (RESUME_MAY_CHANGE).

Several ranks (torchrun): the global batch --batch-size is split over the ranks, and every loss
is the mean over the global batch's pixels (losses.py, across_ranks). The gradient of a global
batch is therefore the same for any number of ranks up to float summation order, with two
exceptions: on a CPU BatchNorm's statistics are each rank's own (SyncBatchNorm, which shares
them, needs CUDA and is used there), and each rank draws its own dropout and stochastic-depth
masks. So runs on different numbers of ranks differ, and --resume on another number of ranks
than the run was saved with is refused.

Outputs in --out, which holds one run, held by one live process (a lock that ends with it):
last.pt, what resuming needs (every --save-every steps and at the end of each epoch), best.pt,
what evaluating or distilling needs: weights, config, meta (the first evaluation, then every
better one: mIoU, or -RMSE for a depth-only model); both written atomically and never with
non-finite weights. log.jsonl: one JSON line per log interval and per evaluation, each written
to the disk before the run goes on; on --resume it is cut back to the checkpoint's step (and a
line torn by a power loss is dropped), so that it reads as one run.
"""

import argparse
import fcntl
import json
import math
import os
import random
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data
import evaluate
import heads
import losses
import mit
import plumbing

# each data set's defaults: the CPU demo for the synthetic scenes, the paper's recipe for the others
RECIPES = {'synthetic': {'backbone': 'b0', 'lr': 6e-4, 'epochs': 24},
           'nyuv2': {'backbone': 'b2', 'lr': 6e-5, 'epochs': 100},
           'cityscapes': {'backbone': 'b2', 'lr': 6e-5, 'epochs': 250}}
# what --resume may change: where and how the run goes on, not what it computes (--out is the
# run directory being resumed, wherever it was moved to)
RESUME_MAY_CHANGE = ('resume', 'out', 'workers', 'device', 'compile', 'log_every', 'save_every', 'eval_every',
                     'eval_batch_size')


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes)')
    a('--model', default='segdepthformer', choices=heads.MODEL_NAMES, help='network; dse* are Deep Sub-Ensembles')
    a('--backbone', choices=list(mit.CONFIGS), help='MiT encoder (default: the data set\'s recipe)')
    a('--num-members', type=plumbing.positive_int, default=10, help='heads per task of a Deep Sub-Ensemble')
    a('--pretrained', help='ImageNet weights for the encoder: an official mit_b2.pth, or Hugging Face\'s '
                           'nvidia/mit-b2 folder (or its .safetensors/.bin); or a whole SegFormer (official, or a '
                           'Hugging Face nvidia/segformer-b2-finetuned-* folder), whose head is kept when the '
                           'classes match')
    a('--init', help='a checkpoint of this script to start from (weights only, e.g. a SegDepthFormer for EMUFormer)')
    a('--epochs', type=plumbing.positive_int, help="default: the data set's recipe")
    a('--batch-size', type=plumbing.positive_int, default=8, help='global batch, split over the ranks')
    a('--lr', type=plumbing.positive_float, help="base learning rate of Eq. 12 (default: the data set's recipe)")
    a('--head-lr-mult', type=plumbing.positive_float, default=10.0, help="decoders' lr = this x lr (SegFormer's recipe)")
    a('--weight-decay', type=plumbing.non_negative_float, default=0.01, help='AdamW; not on norms and biases')
    a('--power', type=plumbing.non_negative_float, default=0.9, help='polynomial decay power of Eq. 12')
    a('--w1', type=plumbing.non_negative_float, default=losses.W1, help='weight of the depth loss (Eq. 7)')
    a('--depth-loss', default='gnll', choices=sorted(losses.DEPTH_LOSSES), help='gnll, or mse/huber for the ablation')
    a('--max-depth', type=plumbing.positive_float, help='metres; farther ground truth is invalid (default: data.MAX_DEPTH, '
                                         '10 nyuv2, 80 cityscapes, 10 synthetic)')
    a('--dropout', type=plumbing.rate, help='set every dropout layer to this rate (the MC Dropout models: 0.2 or 0.5)')
    a('--drop-path', type=plumbing.rate, default=0.1, help='stochastic depth rate of the encoder')
    a('--crop', type=plumbing.positive_int, nargs=2, metavar=('H', 'W'), help='training crop; default the paper\'s')
    a('--synthetic-train', type=plumbing.positive_int, default=200, help='number of synthetic training scenes')
    a('--synthetic-val', type=plumbing.positive_int, default=50, help='number of synthetic validation scenes')
    a('--synthetic-size', type=plumbing.positive_int, nargs=2, default=(96, 128), metavar=('H', 'W'))
    a('--seed', type=int, default=0, help='initialisation and data order (Deep Ensemble members differ here)')
    a('--precision', default='auto', choices=plumbing.PRECISIONS,
      help='autocast: auto is bf16 on GPUs that have it, fp16 (with GradScaler) on others, fp32 on the CPU')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu (default: cuda if there is one)')
    a('--workers', type=plumbing.natural_int, default=plumbing.default_workers(),
      help='data loader processes per rank (default: the cores, at most 4)')
    a('--out', default='runs/train', help='run directory')
    a('--resume', action='store_true', help='continue from OUT/last.pt')
    a('--log-every', type=plumbing.positive_int, default=10, help='steps')
    a('--save-every', type=plumbing.positive_int, default=500, help='steps (and at the end of every epoch)')
    a('--eval-every', type=plumbing.natural_int, default=1, help='epochs (0: only at the end)')
    a('--eval-batch-size', type=plumbing.positive_int, default=1)
    return p


def apply_recipe(args, recipe):
    """Fill the flags left out with the recipe (Loop prints the settings chosen)."""
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_args(args):
    """Everything about the flags that can be wrong, checked before any work."""
    for flag, size in (('--crop', args.crop), ('--synthetic-size', args.synthetic_size)):
        if size and min(size) < mit.MIN_SIZE:
            raise ValueError(f'{flag} {size[0]} {size[1]} is below the encoder\'s minimum of {mit.MIN_SIZE}x{mit.MIN_SIZE}')
    if args.data != 'synthetic' and not args.root:
        raise ValueError(f'--data {args.data} needs --root, the data set directory')


@contextmanager
def run_directory(args):
    """with run_directory(args): --out is this run's, held by this process for the block. Rank 0
    creates it and holds a lock on OUT/.lock, which the operating system lets go of when the
    process ends, killed or not, so that a second process (a second run, or a --resume while
    the first still runs) is refused. Then it checks that the directory holds what the flags
    expect: nothing for a new run, a last.pt for --resume. A directory that this block created
    and left with nothing written in it (a refusal, an early Ctrl-C) is removed on the way out."""
    out, master = args.out, int(os.environ.get('RANK', 0)) == 0
    created = not os.path.exists(out)
    lock_path = os.path.join(out, '.lock')
    lock = None
    try:
        if master:
            plumbing.check_output(out, '--out', overwrite=True, folder=True)
            lock = open(lock_path, 'a')
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(f'--out {out} is in use by another process that is still running; wait for it '
                              f'to end (or stop it), or give another --out') from None
        check_run(args)
        yield
    finally:
        if master and created and os.path.isdir(out) and os.listdir(out) == ['.lock']:
            os.unlink(lock_path)
            os.rmdir(out)
        if lock is not None:
            lock.close()


def check_run(args):
    """What --out must hold: nothing for a new run, last.pt for --resume."""
    held = [name for name in ('last.pt', 'best.pt', 'log.jsonl') if os.path.exists(os.path.join(args.out, name))]
    if held and 'last.pt' not in held:
        leftovers = ' '.join(shlex.quote(os.path.join(args.out, name)) for name in held)
        raise FileExistsError(f'--out {args.out} holds {", ".join(held)} but no last.pt: its run stopped before '
                              f'its first checkpoint, so there is nothing to resume; start over with '
                              f'`rm {leftovers}` and the same command without --resume, or give another --out')
    if args.resume and not held:
        raise FileNotFoundError(f'--resume: {os.path.join(args.out, "last.pt")} does not exist; '
                                f'leave out --resume to start a new run in {args.out}')
    if not args.resume and held:
        raise FileExistsError(f'--out {args.out} already holds a run ({", ".join(held)}): add --resume to '
                              f'continue it, or give another --out (or delete {args.out}) to start over')


# ---------------------------------------------------------------------------------------------
# set-up, data, model

@dataclass
class Process:
    """Where this process runs and in which precision."""
    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype = None  # None: fp32

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world_size > 1


def this_process(args, rank, world_size, device):
    """The Process (its rank and device from plumbing.process_group), TF32, the precision of
    --precision."""
    if args.batch_size % world_size:
        raise ValueError(f'--batch-size {args.batch_size} is not divisible by the {world_size} ranks')
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: fp32 range, faster
    torch.backends.cudnn.allow_tf32 = True
    return Process(rank, world_size, device, plumbing.autocast_dtype(args.precision, device))


class SeededSamples(Dataset):
    """Each sample's augmentation draws from its own seed, made of (seed, epoch, index), in a
    forked RNG that leaves the caller's untouched. So the same sample is augmented the same way
    whichever worker or rank loads it and whether the run was resumed."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            return self.dataset[i]


def training_set(args, **options):
    """The training set of the flags, augmented and seeded per sample; options go to
    data.build_dataset as they are (distill.py asks for the teacher's input there)."""
    return SeededSamples(data.build_dataset(
        args.data, args.root, 'train', train=True, crop_size=args.crop and tuple(args.crop),
        num_images=args.synthetic_train, max_depth=args.max_depth, size=tuple(args.synthetic_size), **options),
        args.seed)


def validation_loader(args, proc):
    """This rank's share of the validation set (the same scenes for every --seed)."""
    val_set = data.build_dataset(args.data, args.root, 'val', train=False, num_images=args.synthetic_val,
                                 max_depth=args.max_depth, size=tuple(args.synthetic_size))
    return plumbing.eval_loader(val_set, args.eval_batch_size, args.workers, proc.rank, proc.world_size, proc.device)


def epoch_loader(train_set, epoch, step, steps_per_epoch, args, proc):
    """This rank's batches of one epoch from `step` on (a resumed epoch starts mid-way).
    DistributedSampler deals rank r every world_size-th index of one shuffled order, so the
    global batch is the same set of samples for any number of ranks."""
    batch_per_rank = args.batch_size // proc.world_size
    train_set.epoch = epoch
    sampler = DistributedSampler(train_set, proc.world_size, proc.rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[(step % steps_per_epoch) * batch_per_rank:]
    # its own generator: a DataLoader would otherwise draw its workers' seeds from the global
    # RNG, and a resumed epoch would then draw different dropout masks
    return DataLoader(train_set, batch_per_rank, sampler=order, num_workers=args.workers,
                      pin_memory=proc.device.type == 'cuda', drop_last=True,
                      generator=torch.Generator().manual_seed(epoch))


def param_groups(model, lr, weight_decay, head_lr_mult):
    """AdamW groups: no weight decay on norms and biases (1-d tensors); the decoders learn
    head_lr_mult times faster than the encoder, which usually starts pre-trained."""
    groups = {}
    for name, p in model.named_parameters():
        head = not name.startswith('backbone.')
        decay = p.ndim > 1
        g = groups.setdefault((head, decay), {'params': [], 'lr_mult': head_lr_mult if head else 1.0,
                                              'weight_decay': weight_decay if decay else 0.0})
        g['params'].append(p)
    return list(groups.values())


def build_network(args, proc, num_classes):
    """The network, seeded by --seed (the same initial weights on every rank) and initialised
    from --pretrained or --init, on the device; AdamW and GradScaler (fp16 only)."""
    torch.manual_seed(args.seed)
    kwargs = {'num_members': args.num_members} if args.model.startswith('dse') else {}
    model = heads.build_model(args.model, args.backbone, num_classes, drop_path_rate=args.drop_path, **kwargs)
    if args.pretrained:
        heads.load_segformer_checkpoint(model, args.pretrained)
    if args.init:
        plumbing.load_strict(model, plumbing.read_state_dict(args.init), args.init)
    if args.dropout is not None:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.p = args.dropout
    model.to(proc.device)
    if proc.ddp and proc.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch
    groups = param_groups(model, args.lr, args.weight_decay, args.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=proc.device.type == 'cuda')
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.amp_dtype == torch.float16)
    if proc.master:
        print(f'{args.model}-{args.backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; '
              + ', '.join(f"{len(g['params'])} tensors lr x{g['lr_mult']:g} wd {g['weight_decay']:g}" for g in groups))
    return model, optimizer, scaler


def wrap(model, args, proc):
    """torch.compile, then DDP; the caller keeps the unwrapped model for saving."""
    if args.compile:
        model = torch.compile(model)
    if proc.ddp:
        # a DSE step uses one head: the others get no gradient, which DDP must be told
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == 'cuda' else None,
                    find_unused_parameters=args.model.startswith('dse'))
    return model


# ---------------------------------------------------------------------------------------------
# resume and save

def rng_state(device):
    state = {'torch': torch.get_rng_state(), 'python': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


@dataclass
class Window:
    """The loss terms summed over the steps since the last log line (device tensors: adding
    them costs no synchronisation), and the seconds those steps took."""
    sums: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, terms):
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()
        self.steps += 1


def mean_over_ranks(sums, proc):
    """{name: tensor} -> their means over the ranks, as one tensor (one all_reduce)."""
    values = torch.stack([v.float() for v in sums.values()]) if sums else torch.zeros(0, device=proc.device)
    if proc.ddp:
        dist.all_reduce(values)
        values /= proc.world_size
    return values


def same_value(a, b):
    """Two values of a flag: equal, or (strings or lists of them) naming the same files."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and a != b and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return a == b


def changed_flags(args, saved):
    """The flags whose values differ from a checkpoint's saved arguments, but for those
    --resume may change."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} in the checkpoint, {v} now"
            for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and not same_value(saved.get(k), v)]


RESUME_KEYS = ('model', 'optimizer', 'scaler', 'step', 'best', 'best_step', 'rng', 'args', 'window', 'meta')


def read_last(path):
    """OUT/last.pt, checked: a dict of this loop, with finite weights."""
    ckpt = plumbing.load_file(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else RESUME_KEYS
    if missing:
        raise ValueError(f'--resume: {path} is not a last.pt of train.py or distill.py (it lacks '
                         f'{", ".join(missing)}); give the --out of such a run')
    bad = [k for k, v in ckpt['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'--resume: {path} holds non-finite weights ({", ".join(bad[:5])}), which this loop '
                         f'never writes: the file was changed after it was saved')
    return ckpt


def cut_log(path, step):
    """Keep the records of log.jsonl up to `step`, the checkpoint's; what was logged after it is
    done again. A line that does not parse (torn or zero-filled by a power loss) can only be
    the last one written, after the checkpoint: it is dropped with the rest. A missing log
    starts empty. -> a note for the user, or None."""
    if not os.path.exists(path):
        plumbing.save_atomic(path, lambda f: None)
        return f'{path} was missing: it starts again at step {step}, without the records before'
    kept, note = [], None
    with open(path, 'rb') as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                note = f'{path}: dropped a damaged line and what followed it (the run stopped while writing)'
                break
            if record['step'] <= step:
                kept.append(line)
    plumbing.save_atomic(path, lambda f: f.write(b''.join(kept)))
    return note


def resume(args, meta, model, optimizer, scaler, proc):
    """Continue from OUT/last.pt -> (step, best, best_step, log window). The random state is
    restored last, after every model (distill.py's teacher too) is built, since building draws
    from it. The checkpoint must have been made with the same flags (but RESUME_MAY_CHANGE), the
    same meta (what the caller computes with) and the same number of ranks."""
    path = os.path.join(args.out, 'last.pt')
    ckpt = read_last(path)
    changed = changed_flags(args, ckpt['args'])
    changed += [f"{k}: {ckpt['meta'].get(k)} in the checkpoint, {v} now" for k, v in meta.items()
                if ckpt['meta'].get(k) != v]
    if changed:
        raise ValueError(f'--resume: {path} was made with other settings: {"; ".join(changed)}. '
                         f'Resume with the same ones, or start a new run in another --out')
    if len(ckpt['rng']) != proc.world_size:
        raise ValueError(f"--resume: {path} was saved by {len(ckpt['rng'])} rank(s), this run has {proc.world_size}; "
                         f"resume on {len(ckpt['rng'])} (each rank's BatchNorm statistics and dropout masks "
                         f"are its own, so another number would not continue the same run)")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if proc.master:
        note = cut_log(os.path.join(args.out, 'log.jsonl'), ckpt['step'])
        print(f"resumed from {path} at step {ckpt['step']}" + (f'; {note}' if note else ''))
    set_rng_state(ckpt['rng'][proc.rank], proc.device)  # each rank continues its own dropout stream
    window = Window({k: v.to(proc.device) for k, v in ckpt['window']['sums'].items()},
                    ckpt['window']['steps'], ckpt['window']['seconds'])
    return ckpt['step'], ckpt['best'], ckpt['best_step'], window


def last_good(path, saved_step):
    return f'the last good checkpoint is {path} (step {saved_step})' if saved_step is not None else \
        'no checkpoint was saved yet'


def check_finite(model, step, path, last_good_text):
    """Weights that are not finite are never written: stop, naming them."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f'non-finite weights at step {step} ({len(bad)} tensors: {", ".join(bad[:5])}); '
                                 f'{path} was not written; {last_good_text}')


def save_best(path, model, meta, args, step, best):
    """best.pt: what evaluating or distilling needs (weights, config, meta), and where it was
    made (step, score, arguments); rank 0 only."""
    plumbing.save_torch({'model': model.state_dict(), 'config': model.config, 'meta': meta,
                         'step': step, 'best': best, 'args': vars(args)}, path)


def save_last(path, model, optimizer, scaler, meta, args, proc, step, best, best_step, window):
    """last.pt: what resuming needs: model (unwrapped), optimizer, scaler, position, best score,
    log window (summed over ranks), every rank's random state and the arguments, atomically
    (rank 0 writes; every rank takes part)."""
    states = [None] * proc.world_size
    if proc.ddp:
        dist.all_gather_object(states, rng_state(proc.device))  # every rank's dropout stream
    else:
        states = [rng_state(proc.device)]
    # the window as rank means: on --resume every rank starts from these
    sums = dict(zip(window.sums, mean_over_ranks(window.sums, proc).cpu()))
    if proc.master:
        plumbing.save_torch({'model': model.state_dict(), 'config': model.config, 'meta': meta,
                             'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                             'step': step, 'best': best, 'best_step': best_step, 'rng': states, 'args': vars(args),
                             'window': {'sums': sums, 'steps': window.steps, 'seconds': window.seconds}}, path)


def write_log(out, record):
    """Append one JSON line to OUT/log.jsonl and put it on the disk before going on."""
    path = os.path.join(out, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(plumbing.json_safe(record)) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f'could not append to {path} ({e.strerror or e}); last.pt is unchanged, '
                      f'--resume continues from it once there is room') from None


# ---------------------------------------------------------------------------------------------
# the steps of the loop

def lr_at(step, total_steps, base_lr, power):
    """Eq. 12: lr = lr_base * (1 - iteration / total iterations)^power."""
    return base_lr * (1 - step / total_steps) ** power


def to_device(batch, device):
    """The batch's tensors on the device (its names stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def optimize(loss, optimizer, scaler):
    """Backward and one AdamW step (through GradScaler, which does nothing but for fp16)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_step(model, batch, head, optimizer, scaler, args, proc):
    """One supervised step: forward and the loss of Eq. 7 against the ground truth under
    autocast (those only), backward, AdamW. head: the Deep Sub-Ensemble head this step trains,
    None for other models. Returns the loss and its terms, on the device."""
    batch = to_device(batch, proc.device)
    with plumbing.autocast(proc.device, proc.amp_dtype):
        out = model(batch['image']) if head is None else model(batch['image'], head=head)
        loss, terms = losses.segdepth_loss(out, batch['label'], batch['depth'], args.w1, args.depth_loss,
                                           across_ranks=proc.ddp)
    optimize(loss, optimizer, scaler)
    return {'loss': loss, **terms}


def log_window(window, step, total_steps, steps_per_epoch, lr, eta, args, proc, saved_step):
    """Print and record the window's mean loss terms (over steps and ranks), lr, speed and the
    ETA (seconds); stop on a non-finite loss, naming the terms. Returns a fresh window."""
    # .item() (here tolist) waits for the device: only here, once per interval
    means = {k: v / window.steps for k, v in zip(window.sums, mean_over_ranks(window.sums, proc).tolist())}
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f'non-finite loss at step {step}: {", ".join(bad)} ({means}); '
                                 f'{last_good(os.path.join(args.out, "last.pt"), saved_step)}')
    ms = 1000 * window.seconds / window.steps
    if proc.master:
        memory = torch.cuda.max_memory_allocated(proc.device) / 2**30 if proc.device.type == 'cuda' else 0
        print(f"step {step}/{total_steps} | epoch {step / steps_per_epoch:.2f} | "
              + ' '.join(f'{k} {v:.4f}' for k, v in means.items())
              + f' | lr {lr:.2e} | {ms:.0f} ms/step | {args.batch_size * 1000 / ms:.1f} img/s'
              + f' | eta {plumbing.format_duration(eta)}'
              + (f' | mem {memory:.1f}G' if memory else ''), flush=True)
        write_log(args.out, {'step': step, 'epoch': step / steps_per_epoch, **means, 'lr': lr,
                             'ms_per_step': ms, 'images_per_s': args.batch_size * 1000 / ms})
    return Window()


def score_name(model):
    """What validate's score is: mIoU, or -RMSE for a depth-only model."""
    return 'seg mIoU' if 'seg' in model.tasks else 'depth RMSE'


def validate(model, val_loader, num_classes, step, args, proc):
    """Evaluate on the validation set (each rank its share, the metrics summed over ranks),
    print and record it -> the score best.pt keeps: mIoU, or -RMSE for a depth-only model."""
    method = 'dse' if isinstance(model, heads.DeepSubEnsemble) else 'none'
    metrics = evaluate.evaluate(model, val_loader, num_classes, method, proc.device, proc.amp_dtype)
    model.train()
    seg, dep = metrics['seg'], metrics['depth']
    if proc.master:
        print(f'eval at step {step}: '
              + (f"seg mIoU {seg['miou']:.4f} seg ECE {seg['ece']:.4f} seg PAvPU {seg['pavpu']:.4f} " if seg else '')
              + (f"depth RMSE {dep['rmse']:.4f} depth delta1 {dep['delta1']:.4f} depth PAvPU {dep['pavpu']:.4f}"
                 if dep else ''), flush=True)
        for note in evaluate.nothing_counted(metrics):
            print(f'  note: {note}')
        write_log(args.out, {'step': step, 'eval': {'seg': seg, 'depth': dep}})
    return seg['miou'] if seg else -dep['rmse']


def improves(score, best):
    """best.pt's policy: the first evaluation is always kept, so a run always ends with a
    best.pt; then any higher score. NaN (nothing was counted) beats nothing, anything beats NaN."""
    return best is None or score > best or (math.isnan(best) and not math.isnan(score))


# ---------------------------------------------------------------------------------------------
# the loop

class Loop:
    """The training loop around a step that the caller takes (train_step here, distill.py its
    own):

        loop = Loop(args, proc, train_set, meta, command)
        with loop:                        # Ctrl-C: one line, naming the step and the --resume command
            for batch in loop.batches():  # the learning rate of Eq. 12 is set for each
                terms = train_step(loop.wrapped, batch, loop.head(), loop.optimizer, loop.scaler, args, proc)
                loop.step_done(terms)     # log, validate, save
        loop.summary()

    It builds the validation data and the network (loop.model, unwrapped; loop.wrapped, which
    the step calls), resumes with --resume, and keeps the position: step, best score and its
    step, the last saved step, the log window. meta is saved in every checkpoint beside the
    weights (the objective, the classes; distill.py's teacher) and must match on --resume.
    command: the command line, for the message of an interrupted run."""

    def __init__(self, args, proc, train_set, meta, command):
        self.args, self.proc, self.train_set, self.meta, self.command = args, proc, train_set, meta, command
        self.num_classes = data.NUM_CLASSES[args.data]
        self.val_loader = validation_loader(args, proc)
        self.steps_per_epoch = len(train_set) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f'{len(train_set)} training samples make no batch of --batch-size {args.batch_size}')
        self.total_steps = args.epochs * self.steps_per_epoch
        self.model, self.optimizer, self.scaler = build_network(args, proc, self.num_classes)
        if args.resume:
            self.step, self.best, self.best_step, self.window = resume(
                args, meta, self.model, self.optimizer, self.scaler, proc)
        else:
            self.step, self.best, self.best_step, self.window = 0, None, None, Window()
            torch.manual_seed(args.seed + proc.rank)  # each rank draws its own dropout and stochastic-depth masks
        self.saved = self.step or None  # the step last.pt holds
        self.wrapped = wrap(self.model, args, proc).train()
        self.paths = {name: os.path.join(args.out, name) for name in ('last.pt', 'best.pt', 'log.jsonl')}
        if proc.master:
            print(f'{args.data}: {args.model}-{args.backbone}, lr {args.lr:g}, {args.epochs} epochs x '
                  f'{self.steps_per_epoch} steps, global batch {args.batch_size} on {proc.world_size} rank(s), '
                  f'{proc.device.type}, autocast {proc.amp_dtype} (the {args.data} recipe where no flag was given)',
                  flush=True)

    def head(self):
        """The Deep Sub-Ensemble head this step trains (they take turns), None for other models."""
        return self.step % self.model.num_members if isinstance(self.model, heads.DeepSubEnsemble) else None

    def batches(self):
        """This rank's batches from the current step to the end, the learning rate set for each.
        Times the steps: ms/step counts a step's own time; the ETA averages everything this
        process did per step so far, evaluations and checkpoints included."""
        self.start, self.start_step = time.perf_counter(), self.step
        while self.step < self.total_steps:
            for batch in epoch_loader(self.train_set, self.step // self.steps_per_epoch, self.step,
                                      self.steps_per_epoch, self.args, self.proc):
                lr = lr_at(self.step, self.total_steps, self.args.lr, self.args.power)
                for g in self.optimizer.param_groups:
                    g['lr'] = lr * g['lr_mult']
                self.lr, self.tick = lr, time.perf_counter()
                yield batch

    def step_done(self, terms):
        """After a step: add its loss terms to the window; log, validate and save when due."""
        args, proc, step = self.args, self.proc, self.step + 1
        self.window.add(terms)
        self.step = step
        self.window.seconds += time.perf_counter() - self.tick
        if step % args.log_every == 0 or step == self.total_steps:
            eta = (time.perf_counter() - self.start) / (step - self.start_step) * (self.total_steps - step)
            self.window = log_window(self.window, step, self.total_steps, self.steps_per_epoch, self.lr, eta,
                                     args, proc, self.saved)
        epoch, end_of_epoch = step // self.steps_per_epoch, step % self.steps_per_epoch == 0
        if end_of_epoch and (step == self.total_steps or (args.eval_every and epoch % args.eval_every == 0)):
            score = validate(self.model, self.val_loader, self.num_classes, step, args, proc)
            if improves(score, self.best):
                self.best, self.best_step = score, step
                check_finite(self.model, step, self.paths['best.pt'], last_good(self.paths['last.pt'], self.saved))
                if proc.master:
                    save_best(self.paths['best.pt'], self.model, self.meta, args, step, score)
        if end_of_epoch or step % args.save_every == 0:
            check_finite(self.model, step, self.paths['last.pt'], last_good(self.paths['last.pt'], self.saved))
            save_last(self.paths['last.pt'], self.model, self.optimizer, self.scaler, self.meta, args, proc,
                      step, self.best, self.best_step, self.window)
            self.saved = step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Ctrl-C -> one line that names the step and how to continue. Interrupted before its
        first last.pt, a run has nothing to resume: its log goes, so that --out holds nothing
        that blocks the same command from starting over."""
        if kind is not KeyboardInterrupt:
            return False
        if self.saved is None:
            if self.proc.master and os.path.exists(self.paths['log.jsonl']):
                os.unlink(self.paths['log.jsonl'])
            raise KeyboardInterrupt(f'interrupted at step {self.step}, before the first checkpoint: nothing to '
                                    f'resume; run the same command again to start over') from None
        resume_command = self.command if self.args.resume else f'{self.command} --resume'
        raise KeyboardInterrupt(f'interrupted at step {self.step}; {self.paths["last.pt"]} holds step {self.saved}; '
                                f'continue with: {resume_command}') from None

    def summary(self):
        """The run's last line: its best evaluation and the files it wrote."""
        if self.proc.master:
            value = self.best if 'seg' in self.model.tasks else -self.best
            print(f'done: best {score_name(self.model)} {value:.4f} at step {self.best_step}; wrote '
                  f"{self.paths['best.pt']}, {self.paths['last.pt']}, {self.paths['log.jsonl']}", flush=True)


def command_line(script, argv):
    """The command that ran this script, for a message (torchrun's own flags are not known here)."""
    launcher = 'torchrun ... ' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else 'python '
    return launcher + shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


def train(args, proc, command):
    """Train args.model with Eq. 7 (train_step) -> the trained model, unwrapped."""
    loop = Loop(args, proc, training_set(args), data.checkpoint_meta(args.data, objective='eq7'), command)
    with loop:
        for batch in loop.batches():
            loop.step_done(train_step(loop.wrapped, batch, loop.head(), loop.optimizer, loop.scaler, args, proc))
    loop.summary()
    return loop.model  # the DDP wrapper goes with this frame, before the process group (plumbing.process_group)


def main(argv=None):
    args = get_parser().parse_args(argv)
    apply_recipe(args, RECIPES[args.data])
    check_args(args)
    with run_directory(args), plumbing.process_group(torch.device(args.device)) as (rank, world_size, device):
        return train(args, this_process(args, rank, world_size, device), command_line('train.py', argv))


if __name__ == '__main__':
    plumbing.entry_point(main)
