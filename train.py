"""
Train SegFormer, DepthFormer, SegDepthFormer or a Deep Sub-Ensemble (paper Sections 3.2 and 4).
distill.py reuses this loop for EMUFormer (Section 3.3).

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

Reproducibility: the model's initialisation follows --seed, every sample's augmentation is
drawn from its own seed (seed, epoch, index), and the order of the samples from (seed, epoch).
So a run gives the same batches whatever the number of data workers or ranks, and --resume
continues mid-epoch with the very batches, weights, optimizer moments and random state it would
have had (exactly, on the CPU; cuDNN/atomics can differ in the last bits on a GPU).

Outputs in --out: last.pt (every --save-every steps and at the end of each epoch, written to a
temporary file and renamed, so a kill never leaves a broken checkpoint), best.pt (the best
validation score: mIoU, or -RMSE for a depth-only model), log.jsonl (one JSON line per log
interval and per evaluation).
"""

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data
import losses
import mit
import uq
from heads import DeepSubEnsemble, build_model

EPOCHS = {'nyuv2': 100, 'cityscapes': 250, 'synthetic': 30}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes)')
    a('--model', default='segdepthformer', help='segformer, depthformer, segdepthformer, dse, dse-segformer, dse-depthformer')
    a('--backbone', default='b2', help='MiT encoder: b0..b5')
    a('--num-members', type=int, default=10, help='heads per task of a Deep Sub-Ensemble')
    a('--pretrained', help='official ImageNet MiT checkpoint (mit_b2.pth) for the encoder')
    a('--init', help='a checkpoint of this script to start from (weights only, e.g. a SegDepthFormer for EMUFormer)')
    a('--epochs', type=int, help='default: 100 nyuv2, 250 cityscapes, 30 synthetic')
    a('--batch-size', type=int, default=8, help='global batch, split over the ranks')
    a('--lr', type=float, default=6e-5, help='base learning rate of Eq. 12')
    a('--head-lr-mult', type=float, default=10.0, help="decoders' lr = this x lr (SegFormer's recipe)")
    a('--weight-decay', type=float, default=0.01, help='AdamW; not on norms and biases')
    a('--power', type=float, default=0.9, help='polynomial decay power of Eq. 12')
    a('--w1', type=float, default=1.0, help='weight of the depth loss (Eq. 7, 11)')
    a('--depth-loss', default='gnll', choices=sorted(losses.DEPTH_LOSSES), help='gnll, or mse/huber for the ablation')
    a('--dropout', type=float, help='set every dropout layer to this rate (the MC Dropout models: 0.2 or 0.5)')
    a('--drop-path', type=float, default=0.1, help='stochastic depth rate of the encoder')
    a('--crop', type=int, nargs=2, metavar=('H', 'W'), help='training crop; default the paper\'s')
    a('--synthetic-train', type=int, default=200, help='number of synthetic training scenes')
    a('--synthetic-val', type=int, default=50, help='number of synthetic validation scenes')
    a('--synthetic-size', type=int, nargs=2, default=(96, 128), metavar=('H', 'W'))
    a('--seed', type=int, default=0, help='initialisation and data order (Deep Ensemble members differ here)')
    a('--amp', default='auto', choices=('auto', 'off', 'bf16', 'fp16'), help='auto: bf16 on GPUs that have it, fp16 (with GradScaler) on others, off on the CPU')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--workers', type=int, default=4, help='data loader processes per rank')
    a('--out', default='runs/train', help='run directory')
    a('--resume', action='store_true', help='continue from OUT/last.pt')
    a('--log-every', type=int, default=10, help='steps')
    a('--save-every', type=int, default=500, help='steps (and at the end of every epoch)')
    a('--eval-every', type=int, default=1, help='epochs (0: only at the end)')
    a('--eval-batch-size', type=int, default=1)
    return p


# ---------------------------------------------------------------------------------------------
# pieces of the loop

def lr_at(step, total_steps, base_lr, power):
    """Eq. 12: lr = lr_base * (1 - iteration / total iterations)^power."""
    return base_lr * (1 - step / total_steps) ** power


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


def epoch_order(dataset, epoch, seed, rank, world_size, skip):
    """This rank's sample indices for one epoch, minus the first `skip` (a resumed epoch).
    DistributedSampler deals rank r every world_size-th index of one shuffled order, so the
    global batch is the same set of samples for any number of ranks."""
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)[skip:]


def autocast_for(args, device):
    """The autocast dtype (None = fp32): bf16 where the GPU has it, fp16 otherwise, fp32 on CPU."""
    if args.amp == 'off' or (args.amp == 'auto' and device.type != 'cuda'):
        return None
    if args.amp == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]


def setup_distributed(device):
    """torchrun's environment -> (rank, world_size, device); a plain process is rank 0 of 1.
    Each rank takes the GPU of its LOCAL_RANK; NCCL between GPUs, gloo between CPU processes."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return int(os.environ['RANK']), world_size, device


def save_atomic(obj, path):
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half


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


def format_eta(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def score(metrics):
    """The number best.pt keeps the maximum of: mIoU, or -RMSE for a depth-only model."""
    return metrics['seg']['miou'] if metrics['seg'] else -metrics['depth']['rmse']


# ---------------------------------------------------------------------------------------------
# the loop

def run(args, teacher=None, loss_weights=(10.0, 1.0), jitter=data.TEACHER_JITTER):
    """Train with the loss of Eq. 7; or, given the checkpoints of a Deep Ensemble `teacher`,
    distil it with Eq. 11 (distill.py): the teacher, frozen and run as one batched model, sees
    the colour-jittered 'image_teacher', and its mean softmax and predictive variance (Eq. 10)
    are the student's targets. loss_weights: w2, w3 of Eq. 11; jitter: the strengths of the
    teacher's colour jitter. Returns the trained model."""
    rank, world_size, device = setup_distributed(torch.device(args.device))
    ddp, master = world_size > 1, rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.batch_size % world_size:
        raise ValueError(f'--batch-size {args.batch_size} is not divisible by the {world_size} ranks')
    batch_per_rank = args.batch_size // world_size

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: fp32 range, faster
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_for(args, device)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 only

    # data
    num_classes = data.NUM_CLASSES[args.data]
    synthetic = dict(size=tuple(args.synthetic_size))  # the same scenes for every --seed
    train_set = SeededSamples(data.build_dataset(
        args.data, args.root, 'train', train=True, crop_size=args.crop and tuple(args.crop),
        teacher_jitter=jitter if teacher is not None else None, num_images=args.synthetic_train, **synthetic), args.seed)
    val_set = data.build_dataset(args.data, args.root, 'val', train=False,
                                 num_images=args.synthetic_val, **synthetic)
    # each rank evaluates every world_size-th image, no padding: the summed metrics are exact
    val_loader = DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size)),
                            args.eval_batch_size, num_workers=args.workers, pin_memory=device.type == 'cuda',
                            generator=torch.Generator())
    steps_per_epoch = len(train_set) // world_size // batch_per_rank
    epochs = args.epochs or EPOCHS[args.data]
    total_steps = epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f'{len(train_set)} training samples make no batch of {args.batch_size}')

    # model
    model = build_model(args.model, args.backbone, num_classes, drop_path_rate=args.drop_path,
                        **({'num_members': args.num_members} if args.model.startswith('dse') else {}))
    if args.pretrained:
        mit.load_pretrained(model.backbone, args.pretrained)
    if args.init:
        mit.load_strict(model, mit.load_file(args.init)['model'], args.init)
    if args.dropout is not None:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.p = args.dropout
    model.to(device)
    if ddp and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch
    groups = param_groups(model, args.lr, args.weight_decay, args.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == 'cuda')
    log(f'{args.model}-{args.backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; '
        + ', '.join(f"{len(g['params'])} tensors lr x{g['lr_mult']:g} wd {g['weight_decay']:g}" for g in groups))

    # resume: weights, optimizer moments, scaler, position and random state
    os.makedirs(args.out, exist_ok=True)
    last, best_path = os.path.join(args.out, 'last.pt'), os.path.join(args.out, 'best.pt')
    step, best = 0, -math.inf
    if args.resume and os.path.exists(last):
        ckpt = torch.load(last, map_location='cpu', weights_only=True)
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step, best = ckpt['step'], ckpt['best']
        # each rank continues its own dropout stream; resumed on more ranks than it was saved
        # with, a new rank takes rank 0's (the weights and batches are exact either way)
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0], device)
        log(f'resumed from {last} at step {step}')

    raw_model = model  # unwrapped and uncompiled, for saving
    if args.compile:
        model = torch.compile(model)
    if ddp:
        # a DSE step uses one head: the others get no gradient, which DDP must be told
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=isinstance(raw_model, DeepSubEnsemble))
    method = 'dse' if isinstance(raw_model, DeepSubEnsemble) else 'none'
    if teacher is not None:
        members = uq.load_members(teacher)
        if set(members[0].tasks) != {'seg', 'depth'} or members[0].num_classes != num_classes:
            raise ValueError(f'the teacher must be SegDepthFormers with {num_classes} classes; '
                             f'{teacher[0]} is {uq.architecture(members[0])}')
        teacher = uq.DeepEnsemble([m.to(device) for m in members])
        log(f'teacher: a Deep Ensemble of {len(members)} x {uq.architecture(members[0])}')

    def checkpoint(path):
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, rng_state(device))  # every rank's dropout stream
        else:
            states = [rng_state(device)]
        if master:
            save_atomic({'model': raw_model.state_dict(), 'config': raw_model.config,
                         'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                         'step': step, 'epoch': step // steps_per_epoch, 'best': best,
                         'rng': states, 'args': vars(args)}, path)

    def validate():
        metrics = uq.evaluate(raw_model, val_loader, num_classes, method, device, autocast)
        raw_model.train()
        return metrics

    def write_log(record):
        if master:
            with open(os.path.join(args.out, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(uq.json_safe(record)) + '\n')

    if step == 0:  # each rank draws its own dropout and stochastic-depth masks
        torch.manual_seed(args.seed + rank)
    log(f'{epochs} epochs x {steps_per_epoch} steps, global batch {args.batch_size} on {world_size} '
        f'rank(s), {device.type}, autocast {amp_dtype}')
    model.train()
    sums, window_start, window_steps = {}, time.perf_counter(), 0
    while step < total_steps:
        epoch = step // steps_per_epoch
        train_set.epoch = epoch
        order = epoch_order(train_set, epoch, args.seed, rank, world_size, (step % steps_per_epoch) * batch_per_rank)
        # its own generator: a DataLoader would otherwise draw its workers' seeds from the global
        # RNG, and a resumed epoch would then draw different dropout masks
        loader = DataLoader(train_set, batch_per_rank, sampler=order, num_workers=args.workers,
                            pin_memory=device.type == 'cuda', drop_last=True,
                            generator=torch.Generator().manual_seed(epoch))
        for batch in loader:
            lr = lr_at(step, total_steps, args.lr, args.power)
            for g in optimizer.param_groups:
                g['lr'] = lr * g['lr_mult']
            images = batch['image'].to(device, non_blocking=True)
            label = batch['label'].to(device, non_blocking=True)
            depth = batch['depth'].to(device, non_blocking=True)
            if teacher is not None:
                with autocast():
                    target = uq.predict(teacher, batch['image_teacher'].to(device, non_blocking=True), 'de')
            with autocast():  # forward and loss only
                out = model(images, head=step % raw_model.num_members) if method == 'dse' else model(images)
                if teacher is None:
                    loss, terms = losses.segdepth_loss(out, label, depth, args.w1, args.depth_loss)
                else:
                    loss, terms = losses.emuformer_loss(out, label, depth, target.log_probs, target.depth_var,
                                                        args.w1, *loss_weights, depth_loss=args.depth_loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            window_steps += 1
            for name, value in {'loss': loss, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach()

            if step % args.log_every == 0 or step == total_steps:
                # .item() waits for the device: only here, once per interval
                values = torch.stack(list(sums.values()))
                if ddp:
                    dist.all_reduce(values)
                    values /= world_size
                means = {k: v / window_steps for k, v in zip(sums, values.tolist())}
                bad = [k for k, v in means.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f'non-finite loss at step {step}: {", ".join(bad)} '
                                             f'({means}); the last good checkpoint is {last}')
                elapsed = time.perf_counter() - window_start
                ms = 1000 * elapsed / window_steps
                memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0
                log(f"step {step}/{total_steps} | epoch {step / steps_per_epoch:.2f} | "
                    + ' '.join(f'{k} {v:.4f}' for k, v in means.items())
                    + f' | lr {lr:.2e} | {ms:.0f} ms/step | {args.batch_size * 1000 / ms:.1f} img/s'
                    + f' | eta {format_eta((total_steps - step) * ms / 1000)}'
                    + (f' | mem {memory:.1f}G' if memory else ''))
                write_log({'step': step, 'epoch': step / steps_per_epoch, **means, 'lr': lr,
                           'ms_per_step': ms, 'images_per_s': args.batch_size * 1000 / ms})
                sums, window_start, window_steps = {}, time.perf_counter(), 0

            end_of_epoch = step % steps_per_epoch == 0
            pause = time.perf_counter()
            if end_of_epoch and (step == total_steps or (args.eval_every and (step // steps_per_epoch) % args.eval_every == 0)):
                metrics = validate()
                seg, dep = metrics['seg'], metrics['depth']
                log(f'eval at step {step}: '
                    + (f"mIoU {seg['miou']:.4f} ECE {seg['ece']:.4f} PAvPU {seg['pavpu']:.4f} " if seg else '')
                    + (f"RMSE {dep['rmse']:.4f} delta1 {dep['delta1']:.4f} PAvPU {dep['pavpu']:.4f}" if dep else ''))
                write_log({'step': step, 'eval': {'seg': seg, 'depth': dep}})
                if score(metrics) > best:
                    best = score(metrics)
                    checkpoint(best_path)
            if end_of_epoch or step % args.save_every == 0:
                checkpoint(last)
            window_start += time.perf_counter() - pause  # evaluation and saving are not step time
    if ddp:
        dist.destroy_process_group()
    return raw_model


def main(argv=None):
    return run(get_parser().parse_args(argv))


if __name__ == '__main__':
    main()
