"""
Post-hoc calibration: the baseline every uncertainty method is asked to beat. Would one
temperature have done as well as a Deep Ensemble or EMUFormer?

For a trained single network (SegFormer, DepthFormer, SegDepthFormer, the EMUFormer student),
fitted on data it did not train on, each by minimising the negative log-likelihood there:

    segmentation  one temperature T      q = softmax(z / T)                 (Guo et al., 2017)
    depth         one variance scale s   sigma^2 -> s sigma^2   (its Gaussian counterpart,
                                                                 Levi et al. 2019)

The depth scale has a closed form: the Gaussian NLL of y under N(mu, s sigma^2) is minimal at
s = mean over valid pixels of (y - mu)^2 / sigma^2, a sum that streams over the data exactly.
The temperature has none; the NLL is convex in 1/T, so a golden-section search over log T
finds it, on the logits of a random sample of up to --pixels labelled pixels (drawn per image
from a fixed seed: the logits of every pixel of a real data set would not fit in memory). The
result goes beside the checkpoint, <checkpoint>.calibration.json, and evaluate.py
--calibration applies it (Calibrated), to the network or its MC Dropout samples.

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
    variance is multiplied by `variance_scale` (calibrate.py fits both)."""

    def __init__(self, model, temperature=1.0, variance_scale=1.0):
        super().__init__()
        self.model, self.temperature, self.variance_scale = model, temperature, variance_scale
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
    """The network of `model` wrapped with the calibration in the JSON file at `path`."""
    try:
        with open(path) as f:
            fitted = json.load(f)
        return Calibrated(model, fitted['temperature'] or 1.0, fitted['variance_scale'] or 1.0)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f'--calibration {path}: not a calibration written by calibrate.py ({e})') from None


@torch.no_grad()
def collect(model, loader, pixels_per_image, seed, device):
    """One pass over the data: a random sample of each image's labelled pixels, their logits
    (n, K) and labels (n,), and the depth's sum of (y - mu)^2 / sigma^2 and its pixel count."""
    logits, labels, ratio, valid_pixels = [], [], 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    for batch in loader:
        out = model(batch['image'].to(device))
        if 'seg_logits' in out:
            z = out['seg_logits'].flatten(2)  # (B, K, H*W); only the sampled pixels leave the device
            for b in range(len(z)):
                where = (batch['label'][b] != data.IGNORE_INDEX).flatten().nonzero().squeeze(1)
                pick = where[torch.randperm(len(where), generator=generator)[:pixels_per_image]]
                logits.append(z[b][:, pick.to(z.device)].T.float().cpu())  # (n, K)
                labels.append(batch['label'][b].flatten()[pick])
        if 'depth_var' in out:
            y = batch['depth'].to(device)
            valid = data.valid_depth(y)
            mu, var = out['depth_mean'].double()[valid], out['depth_var'].double()[valid]
            ratio += ((y.double()[valid] - mu) ** 2 / var).sum().item()
            valid_pixels += int(valid.sum())
    seg = (torch.cat(logits), torch.cat(labels)) if logits else None
    return seg, ratio, valid_pixels


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
    a('--split', default='calib', help='data the network did not train on (synthetic: calib, fresh scenes)')
    a('--max-depth', type=float, help='metres; farther ground truth is invalid (default: data.MAX_DEPTH)')
    a('--pixels', type=int, default=1_000_000, help='labelled pixels sampled for the temperature, in all')
    a('--seed', type=int, default=0, help='the pixel sample')
    a('--out', help='default: <checkpoint without .pt>.calibration.json, beside it')
    a('--overwrite', action='store_true', help='replace an existing --out')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    a('--workers', type=int, default=plumbing.default_workers(), help='data loader processes')
    a('--synthetic-images', type=int, help='synthetic only: number of scenes (default 50)')
    a('--synthetic-size', type=int, nargs=2, default=(96, 128), metavar=('H', 'W'))
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = args.out or os.path.splitext(args.checkpoint)[0] + '.calibration.json'
    plumbing.check_output(out, '--out', args.overwrite)
    model = load_model(args.checkpoint)
    if isinstance(model, DeepSubEnsemble):
        raise ValueError(f'{args.checkpoint} is a Deep Sub-Ensemble; calibration is the baseline of a single network')
    device = torch.device(args.device)
    dataset = data.build_dataset(args.data, args.root, args.split, train=False, max_depth=args.max_depth,
                                 num_images=args.synthetic_images, size=tuple(args.synthetic_size))
    loader = plumbing.eval_loader(dataset, 1, args.workers, 0, 1, device)
    print(f'calibrating {args.checkpoint} on {args.data} {args.split}: {len(dataset)} images')
    seg, ratio, valid_pixels = collect(model.to(device).eval(), loader, max(1, args.pixels // len(dataset)),
                                       args.seed, device)
    fitted = {'checkpoint': args.checkpoint, 'data': args.data, 'split': args.split, 'images': len(dataset),
              'temperature': None, 'variance_scale': None}
    if seg is not None:
        logits, labels = seg
        fitted['temperature'] = fit_temperature(logits, labels)
        fitted.update(seg_pixels=len(labels), seg_nll_before=F.cross_entropy(logits, labels).item(),
                      seg_nll_after=F.cross_entropy(logits / fitted['temperature'], labels).item())
    if valid_pixels:
        fitted.update(variance_scale=ratio / valid_pixels, depth_pixels=valid_pixels)
    plumbing.write_json(fitted, out)
    print(f"temperature {fitted['temperature']}, variance scale {fitted['variance_scale']} -> {out}")
    return fitted


if __name__ == '__main__':
    plumbing.entry_point(main)
