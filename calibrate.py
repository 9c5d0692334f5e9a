"""
Post-hoc calibration: the baseline every uncertainty method is asked to beat. Would one
temperature have done as well as a Deep Ensemble or EMUFormer?

For a trained single network (SegFormer, DepthFormer, SegDepthFormer, the EMUFormer student),
fitted on data it did not train on, each by minimising the negative log-likelihood there:

    segmentation  one temperature T      q = softmax(z / T)                 (Guo et al., 2017)
    depth         one variance scale s   sigma^2 -> s sigma^2   (its Gaussian counterpart,
                                                                 Levi et al. 2019)

And for the depth an interval with a guarantee, by split conformal prediction (Vovk et al.;
Angelopoulos & Bates, "A gentle introduction to conformal prediction", 2021): with the scores
r = |y - mu| / sigma of a sample of the calib split's valid pixels (sigma of the scaled
variance), q is their ceil((n + 1) c)-th smallest, and mu +- q sigma then holds a new pixel's
depth with probability at least c (--coverage, default 90%) wherever the pixels are
exchangeable with those; evaluate.py reports the coverage it achieves and the mean width.

The depth scale has a closed form: the Gaussian NLL of y under N(mu, s sigma^2) is minimal at
s = mean over valid pixels of (y - mu)^2 / sigma^2, a sum that streams over the data exactly.
The temperature has none; the NLL is convex in 1/T, so a golden-section search over log T
finds it, on the logits of a random sample of up to --pixels labelled pixels (drawn per image
from a fixed seed: the logits of every pixel of a real data set would not fit in memory). The
result goes beside the checkpoint, <checkpoint>.calibration.json, with the NLL of each task
before and after on the data it was fitted on (also printed), and evaluate.py --calibration
applies it (Calibrated), to the network or its MC Dropout samples.

    # the synthetic scenes have a calibration split of their own, unseen in training
    python calibrate.py runs/demo0/best.pt --data synthetic --split calib
    python evaluate.py runs/demo0/best.pt --data synthetic --calibration runs/demo0/best.calibration.json
    # real data: a split the network did not train on, e.g. NYUv2's gt_sets/calib.txt, held out
    # of gt_sets/train.txt before training (data.py's layout)
    python calibrate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2 --split calib
"""

import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import plumbing
from heads import DeepSubEnsemble, load_model


class Calibrated(nn.Module):
    """A network whose segmentation logits are divided by `temperature` and whose depth
    variance is multiplied by `variance_scale` (calibrate.py fits both), and whose depth
    interval mu +- q sigma (sigma of the scaled variance) has the split-conformal q, interval_scale."""

    def __init__(self, model, temperature=1.0, variance_scale=1.0, interval_scale=None):
        super().__init__()
        self.model, self.temperature, self.variance_scale = model, temperature, variance_scale
        self.interval_scale = interval_scale  # q of the depth interval mu +- q sigma (evaluate.py reports it)
        self.config, self.tasks, self.num_classes = model.config, model.tasks, model.num_classes
        self.meta = getattr(model, 'meta', {})

    def forward(self, x):
        out = dict(self.model(x))
        if 'seg_logits' in out:
            out['seg_logits'] = out['seg_logits'] / self.temperature
        if 'depth_var' in out:
            out['depth_var'] = out['depth_var'] * self.variance_scale
        return out


def load_calibration(path, model):
    """The network of `model` wrapped with the calibration in the JSON file at `path`. Refused,
    naming the file: a file calibrate.py did not write, a temperature or variance scale that is
    not a positive number, a task of `model` the file has no value for, and another number of
    classes than `model` predicts."""
    try:
        with open(path) as f:
            fitted = json.load(f)
        temperature, scale, num_classes = fitted['temperature'], fitted['variance_scale'], fitted['num_classes']
        interval = fitted.get('interval_scale')  # files of before the interval have none
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'--calibration {path}: not a calibration written by calibrate.py ({e})') from None
    for task, name, value in (('seg', 'temperature', temperature), ('depth', 'variance scale', scale)):
        if task in model.tasks and value is None:
            raise ValueError(f'--calibration {path} has no {name}: it was fitted on a network without the {task} task')
    for name, value in (('temperature', temperature), ('variance scale', scale), ('interval scale', interval)):
        if value is not None and not (type(value) in (int, float) and 0 < value < math.inf):
            raise ValueError(f'--calibration {path}: the {name} must be a positive number, not {value}')
    if 'seg' in model.tasks and num_classes != model.num_classes:
        raise ValueError(f'--calibration {path} was fitted on {num_classes} classes; '
                         f'the network predicts {model.num_classes}')
    return Calibrated(model, 1.0 if temperature is None else temperature, 1.0 if scale is None else scale, interval)


@torch.no_grad()
def collect(model, loader, pixels_per_image, seed, device, dtype):
    """One pass over the data, the forward under autocast to `dtype` (None: fp32): a random
    sample of each image's labelled pixels, their logits (n, K) and labels (n,); and over the
    valid depth pixels the sums of (y - mu)^2 / sigma^2 and of log(2 pi sigma^2), their count,
    and the scores |y - mu| / sigma of a random sample of each image's valid pixels (None for a
    network without depth). Each sample draws from its own generator."""
    logits, labels, ratio, log_var, valid_pixels, scores = [], [], 0.0, 0.0, 0, []
    generator, depth_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    for batch in loader:
        with plumbing.autocast(device, dtype):
            out = model(batch['image'].to(device))
        if 'seg_logits' in out:
            z = out['seg_logits'].flatten(2)  # (B, K, H, W) -> (B, K, H*W); only the sampled pixels leave the device
            for b in range(len(z)):
                where = (batch['label'][b] != data.IGNORE_INDEX).flatten().nonzero().squeeze(1)
                pick = where[torch.randperm(len(where), generator=generator)[:pixels_per_image]]
                logits.append(z[b][:, pick.to(z.device)].T.float().cpu())  # (K, n) -> (n, K)
                labels.append(batch['label'][b].flatten()[pick])
        if 'depth_var' in out:
            y = batch['depth'].to(device)
            valid = data.valid_depth(y)
            # the variance floored as evaluate.py's depth NLL floors it, so that the NLLs agree
            mu = out['depth_mean'].double()[valid]
            var = out['depth_var'].double()[valid].clamp_min(torch.finfo(torch.float32).tiny)
            ratio += ((y.double()[valid] - mu) ** 2 / var).sum().item()
            log_var += torch.log(2 * math.pi * var).sum().item()
            valid_pixels += int(valid.sum())
            for b in range(len(y)):
                where = valid[b].flatten().nonzero().squeeze(1).cpu()
                pick = where[torch.randperm(len(where), generator=depth_generator)[:pixels_per_image]].to(y.device)
                error = (y[b].flatten()[pick].double() - out['depth_mean'][b].flatten()[pick].double()).abs()
                sigma = out['depth_var'][b].flatten()[pick].double().clamp_min(torch.finfo(torch.float32).tiny).sqrt()
                scores.append((error / sigma).cpu())
    seg = (torch.cat(logits), torch.cat(labels)) if logits else None
    depth = (ratio, log_var, valid_pixels, torch.cat(scores)) if valid_pixels else None
    return seg, depth


def conformal_scale(scores, coverage):
    """Split conformal prediction: the ceil((n + 1) c)-th smallest of the n calibration scores,
    c = coverage. For a new score exchangeable with them, P(score <= q) >= c, and < c + 1 / (n + 1)
    if no two scores tie (Angelopoulos & Bates, 2021, Theorem D.1). inf where (n + 1) c > n: too
    few scores for that guarantee."""
    k = max(1, math.ceil((len(scores) + 1) * coverage))
    return math.inf if k > len(scores) else torch.kthvalue(scores, k).values.item()


def depth_nll(ratio, log_var, n, scale=1.0):
    """The mean Gaussian NLL over n pixels with their variances multiplied by `scale`, from
    collect's sums: the mean of 0.5 log(2 pi s sigma^2) + (y - mu)^2 / (2 s sigma^2)."""
    return 0.5 * (log_var / n + math.log(scale) + ratio / (n * scale))


def fit_temperature(logits, labels, low=-4.0, high=4.0, steps=80):
    """The T minimising the mean cross-entropy of softmax(logits / T), by golden-section search
    over log T in [low, high] (T from 0.018 to 55): the NLL is convex in 1/T, hence unimodal in
    log T, and 80 steps shrink the interval by 0.618^80, far below any digit that matters."""
    nll = lambda log_t: F.cross_entropy(logits / math.exp(log_t), labels).item()
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('checkpoint', help='a single network of train.py or distill.py')
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes)')
    a('--split', default='calib', choices=('train', 'val', 'calib'),
      help='data the network did not train on (synthetic: calib, fresh scenes)')
    a('--max-depth', type=plumbing.positive_float,
      help='metres; farther ground truth is invalid (default: data.MAX_DEPTH)')
    a('--pixels', type=plumbing.positive_int, default=1_000_000,
      help='pixels sampled for the temperature, and for the depth interval, in all')
    a('--seed', type=int, default=0, help='the random pixels drawn for the fits')
    a('--coverage', type=plumbing.rate, default=0.9, help='of the depth interval (split conformal), in [0, 1)')
    a('--out', help='default: <checkpoint without .pt>.calibration.json, beside it')
    a('--overwrite', action='store_true', help='replace an existing --out')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    a('--batch-size', type=plumbing.positive_int, default=1, help='images per forward pass')
    a('--precision', default='auto', choices=plumbing.PRECISIONS, help='autocast of the forward pass (plumbing.py)')
    a('--workers', type=plumbing.natural_int, default=plumbing.default_workers(), help='data loader processes')
    data.add_split_options(p, default_split='calib')
    return p


def main(argv=None):
    """Fit, print the fitted values with the NLL before and after, write the JSON; returns its
    content."""
    args = get_parser().parse_args(argv)
    out = args.out or os.path.splitext(args.checkpoint)[0] + '.calibration.json'
    model = load_model(args.checkpoint)
    if isinstance(model, DeepSubEnsemble):
        raise ValueError(f'{args.checkpoint} is a Deep Sub-Ensemble; calibration is the baseline of a single network')
    num_classes = data.NUM_CLASSES[args.data]
    if 'seg' in model.tasks and model.num_classes != num_classes:
        raise ValueError(f'{args.checkpoint} predicts {model.num_classes} classes, {args.data} has {num_classes}')
    plumbing.check_output(out, '--out', args.overwrite)
    device = torch.device(args.device)
    synthetic_count = {'train': args.synthetic_train, 'val': args.synthetic_val, 'calib': args.synthetic_calib}[args.split]
    dataset = data.build_dataset(args.data, args.root, args.split, train=False, max_depth=args.max_depth,
                                 num_images=synthetic_count, size=tuple(args.synthetic_size))
    loader = plumbing.eval_loader(dataset, args.batch_size, args.workers, 0, 1, device)
    print(f'calibrating {args.checkpoint} on {args.data} {args.split}: {len(dataset)} images')
    seg, depth = collect(model.to(device).eval(), loader, max(1, args.pixels // len(dataset)), args.seed, device,
                         plumbing.autocast_dtype(args.precision, device))
    fitted = {'checkpoint': args.checkpoint, 'data': args.data, 'split': args.split, 'images': len(dataset),
              'num_classes': model.num_classes if 'seg' in model.tasks else None,
              'temperature': None, 'variance_scale': None}
    if seg is not None:
        logits, labels = seg
        t = fit_temperature(logits, labels)
        fitted.update(temperature=t, seg_pixels=len(labels), seg_nll_before=F.cross_entropy(logits, labels).item(),
                      seg_nll_after=F.cross_entropy(logits / t, labels).item())
        edge = ' (the end of the search range, e^-4..e^4: not a minimum)' if abs(abs(math.log(t)) - 4) < 1e-6 else ''
        print(f"seg: temperature {t:.4g}{edge} on {len(labels):,} sampled pixels; "
              f"seg NLL {fitted['seg_nll_before']:.4f} -> {fitted['seg_nll_after']:.4f}")
    if depth is not None:
        ratio, log_var, n, scores = depth
        s = ratio / n
        q = conformal_scale(scores / math.sqrt(s), args.coverage)  # sigma of the scaled variance
        if q == math.inf:
            raise ValueError(f'--coverage {args.coverage}: {len(scores)} sampled depth pixels are too few to '
                             f'guarantee it; give more --pixels or more images')
        fitted.update(variance_scale=s, depth_pixels=n, depth_nll_before=depth_nll(ratio, log_var, n),
                      depth_nll_after=depth_nll(ratio, log_var, n, s), interval_coverage_target=args.coverage,
                      interval_scale=q, interval_pixels=len(scores))
        print(f"depth: variance scale {s:.4g} on {n:,} valid pixels; "
              f"depth NLL {fitted['depth_nll_before']:.4f} -> {fitted['depth_nll_after']:.4f}")
        print(f"depth interval: mu +- {q:.4g} sigma for {args.coverage:.0%} coverage (split conformal, "
              f"{len(scores):,} sampled pixels)")
    plumbing.write_json(fitted, out)
    print(f'wrote {out}')
    return fitted


if __name__ == '__main__':
    plumbing.entry_point(main)
