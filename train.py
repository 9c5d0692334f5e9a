"""
Train SegFormer, DepthFormer, SegDepthFormer or a Deep Sub-Ensemble (paper Sections 3.2 and 4).
distill.py trains EMUFormer (Section 3.3) with this file's loop and its own objective.

The paper's recipe is the default: AdamW, lr 6e-5, weight decay 0.01, the polynomial decay of
Eq. 12 (power 0.9), a global batch of 8, 100 epochs on NYUv2 and 250 on Cityscapes, the loss of
Eq. 7 with w1 = 1, and the augmentations of data.py. A Deep Sub-Ensemble trains one head per
step, alternating. A Deep Ensemble is N runs of this script with different --seed.

    # the CPU demo: a B0 SegDepthFormer on the synthetic scenes, a few minutes on 2 cores
    python train.py --data synthetic --backbone b0 --epochs 30 --lr 6e-4 --out runs/demo
    # the paper: NYUv2 from ImageNet weights, one GPU or four
    python train.py --data nyuv2 --root data/nyuv2 --model segdepthformer --backbone b2 \
        --pretrained mit_b2.pth --out runs/sdf_b2
    torchrun --nproc_per_node=4 train.py --data nyuv2 --root data/nyuv2 ... (the same flags)
    # several machines: torchrun's rendezvous, nothing home-made
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py ...
    # a killed run continues exactly where its last checkpoint left it
    python train.py ... --out runs/sdf_b2 --resume

The loop, in nanoGPT's order, one function each below: setup (ranks, device, precision; the
shared pieces are in plumbing.py), build_data, build_model (and the optimizer), resume, then
per step train_step, log_window every --log-every steps, validate at the end of every
--eval-every epochs, and save_checkpoint. The objective is a function loss_fn(out, batch) ->
(loss, terms): Eq. 7 here (supervised_loss), EMUFormer's objective in distill.py.

Reproducibility: the model's initialisation follows --seed, every sample's augmentation is
drawn from its own seed (seed, epoch, index) on one thread, and the order of the samples from
(seed, epoch). So a run gives the same batches, to the bit, whatever the number of data
workers or ranks, and --resume continues mid-epoch with the very batches, weights, optimizer
moments, log window and random state it would have had (exactly, on the CPU; cuDNN and atomics
can differ in the last bits on a GPU), for the flags --resume may change too (RESUME_MAY_CHANGE).

Several ranks (torchrun): the global batch --batch-size is split over the ranks, and every loss
is the mean over the global batch's pixels (losses.py, across_ranks), so the gradient of a
global batch is the same for any number of ranks up to float summation order, with two
exceptions: BatchNorm's statistics are each rank's own (SyncBatchNorm, which shares them, needs
CUDA and is used there), and each rank draws its own dropout and stochastic-depth masks.

Outputs in --out, which holds one run (a second run into it is refused unless it is --resume):
last.pt (every --save-every steps and at the end of each epoch), best.pt (the first evaluation,
then every better one: mIoU, or -RMSE for a depth-only model), both written atomically and
never with non-finite weights; log.jsonl (one JSON line per log interval and per evaluation,
cut back to the checkpoint's step on --resume so that it reads as one run).
"""

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial

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

EPOCHS = {'nyuv2': 100, 'cityscapes': 250, 'synthetic': 30}
# what --resume may change: where and how the run goes on, not what it computes
RESUME_MAY_CHANGE = ('resume', 'workers', 'device', 'compile', 'log_every', 'save_every', 'eval_every',
                     'eval_batch_size')


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes)')
    a('--model', default='segdepthformer', choices=heads.MODEL_NAMES, help='network; dse* are Deep Sub-Ensembles')
    a('--backbone', default='b2', choices=list(mit.CONFIGS), help='MiT encoder')
    a('--num-members', type=int, default=10, help='heads per task of a Deep Sub-Ensemble')
    a('--pretrained', help='official ImageNet MiT checkpoint (mit_b2.pth) for the encoder')
    a('--init', help='a checkpoint of this script to start from (weights only, e.g. a SegDepthFormer for EMUFormer)')
    a('--epochs', type=int, help='default: 100 nyuv2, 250 cityscapes, 30 synthetic')
    a('--batch-size', type=int, default=8, help='global batch, split over the ranks')
    a('--lr', type=float, default=6e-5, help='base learning rate of Eq. 12')
    a('--head-lr-mult', type=float, default=10.0, help="decoders' lr = this x lr (SegFormer's recipe)")
    a('--weight-decay', type=float, default=0.01, help='AdamW; not on norms and biases')
    a('--power', type=float, default=0.9, help='polynomial decay power of Eq. 12')
    a('--w1', type=float, default=losses.W1, help='weight of the depth loss (Eq. 7)')
    a('--depth-loss', default='gnll', choices=sorted(losses.DEPTH_LOSSES), help='gnll, or mse/huber for the ablation')
    a('--max-depth', type=float, help='metres; farther ground truth is invalid (default: data.MAX_DEPTH, '
                                      '10 nyuv2, 80 cityscapes, 10 synthetic)')
    a('--dropout', type=float, help='set every dropout layer to this rate (the MC Dropout models: 0.2 or 0.5)')
    a('--drop-path', type=float, default=0.1, help='stochastic depth rate of the encoder')
    a('--crop', type=int, nargs=2, metavar=('H', 'W'), help='training crop; default the paper\'s')
    a('--synthetic-train', type=int, default=200, help='number of synthetic training scenes')
    a('--synthetic-val', type=int, default=50, help='number of synthetic validation scenes')
    a('--synthetic-size', type=int, nargs=2, default=(96, 128), metavar=('H', 'W'))
    a('--seed', type=int, default=0, help='initialisation and data order (Deep Ensemble members differ here)')
    a('--precision', default='auto', choices=plumbing.PRECISIONS,
      help='autocast: auto is bf16 on GPUs that have it, fp16 (with GradScaler) on others, fp32 on the CPU')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu (default: cuda if there is one)')
    a('--workers', type=int, default=plumbing.default_workers(), help='data loader processes per rank (default: the cores, at most 4)')
    a('--out', default='runs/train', help='run directory')
    a('--resume', action='store_true', help='continue from OUT/last.pt')
    a('--log-every', type=int, default=10, help='steps')
    a('--save-every', type=int, default=500, help='steps (and at the end of every epoch)')
    a('--eval-every', type=int, default=1, help='epochs (0: only at the end)')
    a('--eval-batch-size', type=int, default=1)
    return p


def check_args(args):
    """Everything about the flags and the run directory that can be wrong, checked before any
    work: a run directory holds one run; --resume needs one; sizes fit the encoder."""
    for flag, size in (('--crop', args.crop), ('--synthetic-size', args.synthetic_size)):
        if size and min(size) < mit.MIN_SIZE:
            raise ValueError(f'{flag} {size[0]} {size[1]} is below the encoder\'s minimum of {mit.MIN_SIZE}x{mit.MIN_SIZE}')
    if args.data != 'synthetic' and not args.root:
        raise ValueError(f'--data {args.data} needs --root, the data set directory')
    held = [name for name in ('last.pt', 'best.pt', 'log.jsonl') if os.path.exists(os.path.join(args.out, name))]
    if args.resume and 'last.pt' not in held:
        raise FileNotFoundError(f'--resume: {os.path.join(args.out, "last.pt")} does not exist; '
                                f'leave out --resume to start a new run in {args.out}')
    if not args.resume and held:
        raise FileExistsError(f'--out {args.out} already holds a run ({", ".join(held)}): add --resume to '
                              f'continue it, or give another --out (or delete {args.out}) to start over')
    plumbing.check_output(args.out, '--out', overwrite=True, folder=True)


# ---------------------------------------------------------------------------------------------
# set-up, data, model

@dataclass
class Setup:
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


def setup(args, rank, world_size, device):
    """The Setup of this process (its rank and device from plumbing.process_group), TF32, the
    precision of --precision."""
    if args.batch_size % world_size:
        raise ValueError(f'--batch-size {args.batch_size} is not divisible by the {world_size} ranks')
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: fp32 range, faster
    torch.backends.cudnn.allow_tf32 = True
    return Setup(rank, world_size, device, plumbing.autocast_dtype(args.precision, device))


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


def build_data(args, run, teacher_jitter=None):
    """The training set (augmented, seeded per sample), this rank's share of the validation
    set, and the steps per epoch. teacher_jitter adds 'image_teacher' to every training sample."""
    common = dict(max_depth=args.max_depth, size=tuple(args.synthetic_size))  # the same scenes for every --seed
    train_set = SeededSamples(data.build_dataset(
        args.data, args.root, 'train', train=True, crop_size=args.crop and tuple(args.crop),
        teacher_jitter=teacher_jitter, num_images=args.synthetic_train, **common), args.seed)
    val_set = data.build_dataset(args.data, args.root, 'val', train=False, num_images=args.synthetic_val, **common)
    val_loader = plumbing.eval_loader(val_set, args.eval_batch_size, args.workers, run.rank, run.world_size, run.device)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'{len(train_set)} training samples make no batch of {args.batch_size}')
    return train_set, val_loader, steps_per_epoch


def epoch_loader(train_set, epoch, step, steps_per_epoch, args, run):
    """This rank's batches of one epoch from `step` on (a resumed epoch starts mid-way).
    DistributedSampler deals rank r every world_size-th index of one shuffled order, so the
    global batch is the same set of samples for any number of ranks."""
    batch_per_rank = args.batch_size // run.world_size
    train_set.epoch = epoch
    sampler = DistributedSampler(train_set, run.world_size, run.rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[(step % steps_per_epoch) * batch_per_rank:]
    # its own generator: a DataLoader would otherwise draw its workers' seeds from the global
    # RNG, and a resumed epoch would then draw different dropout masks
    return DataLoader(train_set, batch_per_rank, sampler=order, num_workers=args.workers,
                      pin_memory=run.device.type == 'cuda', drop_last=True,
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


def build_model(args, run, num_classes):
    """The network, seeded by --seed (the same initial weights on every rank) and initialised
    from --pretrained or --init, on the device; AdamW and GradScaler (fp16 only)."""
    torch.manual_seed(args.seed)
    kwargs = {'num_members': args.num_members} if args.model.startswith('dse') else {}
    model = heads.build_model(args.model, args.backbone, num_classes, drop_path_rate=args.drop_path, **kwargs)
    if args.pretrained:
        mit.load_pretrained(model.backbone, args.pretrained)
    if args.init:
        plumbing.load_strict(model, plumbing.read_state_dict(args.init), args.init)
    if args.dropout is not None:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.p = args.dropout
    model.to(run.device)
    if run.ddp and run.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch
    groups = param_groups(model, args.lr, args.weight_decay, args.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=run.device.type == 'cuda')
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    if run.master:
        print(f'{args.model}-{args.backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; '
              + ', '.join(f"{len(g['params'])} tensors lr x{g['lr_mult']:g} wd {g['weight_decay']:g}" for g in groups))
    return model, optimizer, scaler


def wrap(model, args, run):
    """torch.compile, then DDP; the caller keeps the unwrapped model for saving."""
    if args.compile:
        model = torch.compile(model)
    if run.ddp:
        # a DSE step uses one head: the others get no gradient, which DDP must be told
        model = DDP(model, device_ids=[run.device.index] if run.device.type == 'cuda' else None,
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


def mean_over_ranks(sums, run):
    """{name: tensor} -> their means over the ranks, as one tensor (one all_reduce)."""
    values = torch.stack([v.float() for v in sums.values()]) if sums else torch.zeros(0, device=run.device)
    if run.ddp:
        dist.all_reduce(values)
        values /= run.world_size
    return values


def changed_flags(args, saved):
    """The flags whose values differ from a checkpoint's saved arguments, but for those
    --resume may change."""
    same = lambda a, b: (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)
    return [f"--{k.replace('_', '-')} {saved.get(k)} in the checkpoint, {v} now"
            for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and not same(saved.get(k), v)]


def resume(args, model, optimizer, scaler, run):
    """Continue from OUT/last.pt -> (step, best, log window). The random state is restored
    last, after every model (distill.py's teacher too) is built, since building draws from it.
    The log is cut back to the checkpoint's step: what was logged after it is done again."""
    path = os.path.join(args.out, 'last.pt')
    ckpt = plumbing.load_file(path)
    changed = changed_flags(args, ckpt['args'])
    if changed:
        raise ValueError(f'--resume: {path} was made with other flags: {"; ".join(changed)}. '
                         f'Resume with the same flags, or start a new run in another --out')
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if run.master:
        log_path = os.path.join(args.out, 'log.jsonl')
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)['step'] <= ckpt['step']]
        plumbing.save_atomic(log_path, lambda f: f.write(''.join(kept).encode()))
        print(f"resumed from {path} at step {ckpt['step']}")
    # each rank continues its own dropout stream; resumed on more ranks than it was saved
    # with, a new rank takes rank 0's (the weights and batches are exact either way)
    set_rng_state(ckpt['rng'][run.rank] if run.rank < len(ckpt['rng']) else ckpt['rng'][0], run.device)
    window = Window({k: v.to(run.device) for k, v in ckpt['window']['sums'].items()},
                    ckpt['window']['steps'], ckpt['window']['seconds'])
    return ckpt['step'], ckpt['best'], window


def last_good(path, saved_step):
    return f'the last good checkpoint is {path} (step {saved_step})' if saved_step is not None else \
        'no checkpoint was saved yet'


def save_checkpoint(path, model, optimizer, scaler, step, best, window, args, run, meta, saved_step):
    """Write model (unwrapped), optimizer, scaler, position, best score, log window (summed
    over ranks), every rank's random state and the arguments to `path`, atomically (rank 0;
    every rank takes part). Weights that are not finite are never written."""
    finite = torch.stack([torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()])
    if not finite.all():
        bad = [k for (k, v), ok in zip(((k, v) for k, v in model.state_dict().items() if v.is_floating_point()), finite) if not ok]
        raise FloatingPointError(f'non-finite weights at step {step} ({len(bad)} tensors: {", ".join(bad[:5])}); '
                                 f'{path} was not written; {last_good(os.path.join(args.out, "last.pt"), saved_step)}')
    states = [None] * run.world_size
    if run.ddp:
        dist.all_gather_object(states, rng_state(run.device))  # every rank's dropout stream
    else:
        states = [rng_state(run.device)]
    # the window as rank means: on --resume every rank starts from these, whatever their number
    sums = dict(zip(window.sums, mean_over_ranks(window.sums, run).cpu()))
    if run.master:
        plumbing.save_torch({'model': model.state_dict(), 'config': model.config, 'meta': meta,
                             'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                             'step': step, 'best': best, 'rng': states, 'args': vars(args),
                             'window': {'sums': sums, 'steps': window.steps, 'seconds': window.seconds}}, path)


# ---------------------------------------------------------------------------------------------
# the steps of the loop

def lr_at(step, total_steps, base_lr, power):
    """Eq. 12: lr = lr_base * (1 - iteration / total iterations)^power."""
    return base_lr * (1 - step / total_steps) ** power


def supervised_loss(out, batch, w1, depth_loss, across_ranks):
    """The objective of this script: Eq. 7 against the batch's ground truth."""
    return losses.segdepth_loss(out, batch['label'], batch['depth'], w1, depth_loss, across_ranks)


def train_step(model, batch, head, loss_fn, optimizer, scaler, run):
    """One optimizer step: forward and loss under autocast (those only), backward, AdamW.
    head: the Deep Sub-Ensemble head this step trains, None for other models. Returns the
    loss and its terms, on the device."""
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    with plumbing.autocast(run.device, run.amp_dtype):
        out = model(batch['image']) if head is None else model(batch['image'], head=head)
        loss, terms = loss_fn(out, batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {'loss': loss, **terms}


def write_log(out, record):
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(plumbing.json_safe(record)) + '\n')


def log_window(window, step, total_steps, steps_per_epoch, lr, args, run, saved_step):
    """Print and record the window's mean loss terms (over steps and ranks), lr, speed and ETA;
    stop on a non-finite loss, naming the terms. Returns a fresh window."""
    # .item() (here tolist) waits for the device: only here, once per interval
    means = {k: v / window.steps for k, v in zip(window.sums, mean_over_ranks(window.sums, run).tolist())}
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f'non-finite loss at step {step}: {", ".join(bad)} ({means}); '
                                 f'{last_good(os.path.join(args.out, "last.pt"), saved_step)}')
    ms = 1000 * window.seconds / window.steps
    if run.master:
        memory = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == 'cuda' else 0
        print(f"step {step}/{total_steps} | epoch {step / steps_per_epoch:.2f} | "
              + ' '.join(f'{k} {v:.4f}' for k, v in means.items())
              + f' | lr {lr:.2e} | {ms:.0f} ms/step | {args.batch_size * 1000 / ms:.1f} img/s'
              + f' | eta {plumbing.format_duration((total_steps - step) * ms / 1000)}'
              + (f' | mem {memory:.1f}G' if memory else ''), flush=True)
        write_log(args.out, {'step': step, 'epoch': step / steps_per_epoch, **means, 'lr': lr,
                             'ms_per_step': ms, 'images_per_s': args.batch_size * 1000 / ms})
    return Window()


def validate(model, val_loader, num_classes, step, args, run):
    """Evaluate on the validation set (each rank its share, the metrics summed over ranks),
    print and record it -> the score best.pt keeps: mIoU, or -RMSE for a depth-only model."""
    method = 'dse' if isinstance(model, heads.DeepSubEnsemble) else 'none'
    metrics = evaluate.evaluate(model, val_loader, num_classes, method, run.device, run.amp_dtype)
    model.train()
    seg, dep = metrics['seg'], metrics['depth']
    if run.master:
        print(f'eval at step {step}: '
              + (f"mIoU {seg['miou']:.4f} ECE {seg['ece']:.4f} PAvPU {seg['pavpu']:.4f} " if seg else '')
              + (f"RMSE {dep['rmse']:.4f} delta1 {dep['delta1']:.4f} PAvPU {dep['pavpu']:.4f}" if dep else ''))
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

def train(args, run, loss_fn, meta, teacher_jitter=None):
    """Train args.model with loss_fn(out, batch) -> (loss, terms) on the devices of `run` (a
    Setup). meta: saved in every checkpoint beside the weights (the objective, the classes).
    teacher_jitter: see build_data. Returns the trained model, unwrapped."""
    num_classes = data.NUM_CLASSES[args.data]
    train_set, val_loader, steps_per_epoch = build_data(args, run, teacher_jitter)
    total_steps = (args.epochs or EPOCHS[args.data]) * steps_per_epoch
    raw, optimizer, scaler = build_model(args, run, num_classes)
    step, best, window = resume(args, raw, optimizer, scaler, run) if args.resume else (0, None, Window())
    if not args.resume:  # each rank draws its own dropout and stochastic-depth masks
        torch.manual_seed(args.seed + run.rank)
    model = wrap(raw, args, run).train()
    last, best_path, saved = os.path.join(args.out, 'last.pt'), os.path.join(args.out, 'best.pt'), step or None
    checkpoint = dict(model=raw, optimizer=optimizer, scaler=scaler, args=args, run=run, meta=meta)
    if run.master:
        print(f'{total_steps // steps_per_epoch} epochs x {steps_per_epoch} steps, global batch {args.batch_size} '
              f'on {run.world_size} rank(s), {run.device.type}, autocast {run.amp_dtype}')
    while step < total_steps:
        tick = time.perf_counter()
        for batch in epoch_loader(train_set, step // steps_per_epoch, step, steps_per_epoch, args, run):
            lr = lr_at(step, total_steps, args.lr, args.power)
            for g in optimizer.param_groups:
                g['lr'] = lr * g['lr_mult']
            head = step % raw.num_members if isinstance(raw, heads.DeepSubEnsemble) else None
            window.add(train_step(model, batch, head, loss_fn, optimizer, scaler, run))
            step += 1
            window.seconds += time.perf_counter() - tick
            if step % args.log_every == 0 or step == total_steps:
                window = log_window(window, step, total_steps, steps_per_epoch, lr, args, run, saved)
            epoch, end_of_epoch = step // steps_per_epoch, step % steps_per_epoch == 0
            if end_of_epoch and (step == total_steps or (args.eval_every and epoch % args.eval_every == 0)):
                score = validate(raw, val_loader, num_classes, step, args, run)
                if improves(score, best):
                    best = score
                    save_checkpoint(best_path, step=step, best=best, window=window, saved_step=saved, **checkpoint)
            if end_of_epoch or step % args.save_every == 0:
                save_checkpoint(last, step=step, best=best, window=window, saved_step=saved, **checkpoint)
                saved = step
            tick = time.perf_counter()  # evaluating and saving are not step time
    return raw  # the DDP wrapper goes with this frame, before the process group (plumbing.process_group)


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    with plumbing.process_group(torch.device(args.device)) as (rank, world_size, device):
        run = setup(args, rank, world_size, device)
        loss_fn = partial(supervised_loss, w1=args.w1, depth_loss=args.depth_loss, across_ranks=run.ddp)
        return train(args, run, loss_fn, meta=data.describe(args.data, objective='eq7'))


if __name__ == '__main__':
    plumbing.entry_point(main)
