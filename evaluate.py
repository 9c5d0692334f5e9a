"""
Evaluate a trained model and its uncertainty on a data set split: one row of the paper's
Tables 2-7, and on request pictures like its Figure 5 and a reliability diagram.

What is evaluated (uq.py has the methods and the metrics):

    one checkpoint                      the network as it is ('none', the "Baseline" rows), or
                                        with --method mcd --dropout 0.2 --samples 10 (MC Dropout)
    a Deep Sub-Ensemble checkpoint      all its heads ('dse', inferred from the checkpoint)
    several checkpoints                 a Deep Ensemble of them ('de', inferred), run as one
                                        vmap-batched model; they must share one architecture

The row has the paper's columns (Section 4, "Metrics"):

    Semantic Segmentation       mIoU, ECE (15 bins), p(acc/cer), p(unc/inacc), PAvPU
    Monocular Depth Estimation  RMSE (metres), p(acc/cer), p(unc/inacc), PAvPU
    Inference Time [ms]         mean +- std over batches of predict(), after --warmup batches

p(acc/cer) is p(accurate|certain) and p(unc/inacc) is p(uncertain|inaccurate) of Mukhoti & Gal,
with each image's mean uncertainty as the threshold (the tables' header prints the second as
"p(inacc/unc)", but Section 4 defines p(uncertain|inaccurate), which is what is computed). A task
the model lacks prints '-' and is null in the JSON. The depth line below the row adds AbsRel and
delta1..3 (Eq. 13). The time is that of one batch of --batch-size images (1, as in the paper,
makes it the time per image), measured around predict() with the device synchronised; the first
--warmup batches of every rank are left out (allocation, cuDNN autotuning).

    # the single network (method 'none'); --json writes the same numbers
    python evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2 --json out/sdf_b2.json
    # MC Dropout with 20 % dropout and 10 passes
    python evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2 --method mcd --dropout 0.2
    # a Deep Sub-Ensemble (method inferred) and a Deep Ensemble of ten runs (method inferred)
    python evaluate.py runs/dse_b2/best.pt --data nyuv2 --root data/nyuv2
    python evaluate.py runs/sdf_b2_seed*/best.pt --data nyuv2 --root data/nyuv2
    # the CPU demo of train.py, with pictures (one PNG per image, plus reliability.png)
    python evaluate.py runs/demo/best.pt --data synthetic --save-vis out/vis --num-vis 8
    # several GPUs: each rank evaluates every world_size-th image (on the CPU: add --device cpu)
    torchrun --standalone --nproc_per_node=4 evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2

Under torchrun the ranks share the images without padding duplicates, and the metrics' sums are
added over the ranks before anything is computed, so the row is the one a single process gives
(timing aside). Only rank 0 prints and writes; its pictures show the first --num-vis images of
its own share (images 0, W, 2W, ... with W ranks), named after the samples.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset

import data
import uq
from heads import DeepSubEnsemble
from train import setup_distributed

DISPLAY_NAMES = {'segformer': 'SegFormer', 'depthformer': 'DepthFormer', 'segdepthformer': 'SegDepthFormer',
                 'dse': 'SegDepthFormer', 'dse-segformer': 'SegFormer', 'dse-depthformer': 'DepthFormer'}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('checkpoints', nargs='+', help='checkpoint(s) of train.py or distill.py; several = a Deep Ensemble')
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes; ignored for synthetic)')
    a('--split', default='val', choices=('train', 'val'), help='data set split')
    a('--method', choices=uq.METHODS,
      help="uncertainty method; default: 'de' for several checkpoints, 'dse' for a Deep Sub-Ensemble, else 'none'")
    a('--samples', type=int, default=10, help='MC Dropout: forward passes')
    a('--dropout', type=float, default=0.2, help='MC Dropout: dropout rate at test time (the paper: 0.2, 0.5)')
    a('--batch-size', type=int, default=1, help='images per predict() call, per rank (1: time per image)')
    a('--workers', type=int, default=4, help='data loader processes per rank')
    a('--amp', default='off', choices=('off', 'bf16', 'fp16'), help='autocast dtype of the forward passes')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    a('--warmup', type=int, default=5, help='batches per rank left out of the timing')
    a('--seed', type=int, default=0, help='seed of the MC Dropout masks (plus the rank)')
    a('--json', help='write the result here as JSON')
    a('--save-vis', metavar='DIR', help='write Figure-5-like PNGs and reliability.png here')
    a('--num-vis', type=int, default=8, help='images to draw with --save-vis')
    a('--label', help='row label; default e.g. "SegDepthFormer-B2 (DE x10)"')
    a('--synthetic-images', type=int, help='synthetic only: number of scenes (default 50 val, 200 train)')
    a('--synthetic-size', type=int, nargs=2, default=(96, 128), metavar=('H', 'W'),
      help='synthetic only: scene size')
    return p


# ---------------------------------------------------------------------------------------------
# models and methods

def resolve_method(method, models, paths):
    """The uncertainty method for these checkpoints: the one asked for if it fits, else the only
    one that does ('de' for several, 'dse' for a DSE, 'none' otherwise)."""
    is_dse = isinstance(models[0], DeepSubEnsemble)
    if len(models) > 1:
        if method not in (None, 'de'):
            raise ValueError(f'{len(models)} checkpoints form a Deep Ensemble: use --method de '
                             f'(or leave --method out), not {method!r}')
        return 'de'
    if is_dse and method not in (None, 'dse'):
        raise ValueError(f'{paths[0]} is a Deep Sub-Ensemble ({uq.architecture(models[0])}): use --method dse '
                         f'(or leave --method out), not {method!r}')
    if not is_dse and method == 'dse':
        raise ValueError(f'--method dse needs a Deep Sub-Ensemble checkpoint (model dse, dse-segformer or '
                         f'dse-depthformer); {paths[0]} holds {uq.architecture(models[0])}')
    if method == 'de':
        raise ValueError(f'--method de needs one checkpoint per member of the Deep Ensemble; got only {paths[0]}')
    return 'dse' if is_dse else method or 'none'


def default_label(models, method, dropout):
    """E.g. 'SegDepthFormer-B2', 'SegFormer-B0 (MCD 20%)', 'SegDepthFormer-B2 (DE x10)'."""
    cfg = models[0].config
    label = f"{DISPLAY_NAMES[cfg['name']]}-{cfg['backbone'].upper()}"
    if method == 'mcd':
        return f'{label} (MCD {dropout:.0%})'
    if method == 'dse':
        return f'{label} (DSE x{models[0].num_members})'
    if method == 'de':
        return f'{label} (DE x{len(models)})'
    return label


# ---------------------------------------------------------------------------------------------
# numbers: the reliability bins, timing, JSON, the printed row

def reliability_bins(seg):
    """The ECE bins of a uq.SegMetrics after reduce(): bin m holds the labelled pixels with
    confidence in (m/M, (m+1)/M]; accuracy and confidence are the bin's means (NaN if empty)."""
    count = seg.stats['bin_count'].tolist()
    correct = seg.stats['bin_correct'].tolist()
    confidence = seg.stats['bin_confidence'].tolist()
    M = seg.num_bins
    return {'edges': [m / M for m in range(M + 1)], 'count': count,
            'accuracy': [c / n if n else math.nan for c, n in zip(correct, count)],
            'confidence': [s / n if n else math.nan for s, n in zip(confidence, count)]}


def timing(times, warmup):
    """Seconds per batch of this rank -> ms {mean, std, n, warmup} over the batches of all ranks
    after each rank's first `warmup`; the std is over batches, with 1/n. NaN if no batch is left."""
    kept = [1000 * t for t in times[warmup:]]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, kept)
        kept = [t for rank_times in gathered for t in rank_times]
    kept = np.array(kept)
    return {'mean': kept.mean() if kept.size else math.nan, 'std': kept.std() if kept.size else math.nan,
            'n': int(kept.size), 'warmup': warmup}


# (task, key, header) of the paper's columns, in the order of Tables 2-7
COLUMNS = [('seg', 'miou', 'mIoU'), ('seg', 'ece', 'ECE'), ('seg', 'p_accurate_certain', 'p(acc/cer)'),
           ('seg', 'p_uncertain_inaccurate', 'p(unc/inacc)'), ('seg', 'pavpu', 'PAvPU'),
           ('depth', 'rmse', 'RMSE'), ('depth', 'p_accurate_certain', 'p(acc/cer)'),
           ('depth', 'p_uncertain_inaccurate', 'p(unc/inacc)'), ('depth', 'pavpu', 'PAvPU')]


def _number(value, digits=3):
    return 'nan' if value is None else f'{value:.{digits}f}'  # None: NaN after uq.json_safe


def format_row(result):
    """Three lines: the task groups, the paper's column headers and the row of a json_safe result
    ('-' for a task the model lacks, 'nan' for a metric with nothing to count)."""
    first = max(len(result['label']), 20)
    widths = [max(len(header), 6) for _, _, header in COLUMNS]
    cells = [_number(result[task][key]) if result[task] else '-' for task, key, _ in COLUMNS]
    time_cell = f"{_number(result['time_ms']['mean'], 2)} +- {_number(result['time_ms']['std'], 2)}"
    seg_width, depth_width = sum(w + 2 for w in widths[:5]), sum(w + 2 for w in widths[5:])
    groups = ' ' * (first + 2) + f"{'Semantic Segmentation':{seg_width}}{'Monocular Depth Estimation':{depth_width}}"
    header = ' ' * first + ''.join(f'  {h:>{w}}' for (_, _, h), w in zip(COLUMNS, widths))
    row = f"{result['label']:{first}}" + ''.join(f'  {c:>{w}}' for c, w in zip(cells, widths))
    header, row = header + '  Inference Time [ms]', row + f'  {time_cell:>19}'
    return '\n'.join([groups.rstrip(), header, row])


def format_extras(result):
    """The numbers outside the paper's columns: pixel accuracy, AbsRel, delta1..3, how timed."""
    lines = []
    if result['seg']:
        lines.append(f"segmentation: pixel accuracy {_number(result['seg']['pixel_acc'])}")
    if result['depth']:
        d = result['depth']
        lines.append(f"depth: AbsRel {_number(d['abs_rel'])}  delta1 {_number(d['delta1'])}  "
                     f"delta2 {_number(d['delta2'])}  delta3 {_number(d['delta3'])}")
    t, s = result['time_ms'], result['settings']
    lines.append(f"time: {t['n']} batches of {s['batch_size']} image(s) on {s['device']} ({s['amp']} autocast), "
                 f"after {t['warmup']} warm-up batches on each of {s['world_size']} rank(s)")
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# pictures: colour maps, the panels of one image, the figure, the reliability diagram

def _lut(anchors):
    """A (256, 3) uint8 colour map, linear between equally spaced anchor colours."""
    anchors = np.array(anchors, dtype=np.float64)
    x, t = np.linspace(0, 1, len(anchors)), np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


# samples of matplotlib's viridis and inferno: perceptually even, readable in grey
VIRIDIS = _lut([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)])  # depth: near purple, far yellow
INFERNO = _lut([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)])  # uncertainty: dark = certain
ERRORS = _lut([(255, 255, 255), (255, 170, 130), (200, 0, 0)])  # white = right, red = wrong; black stays free
WRONG = (200, 0, 0)


def colorize(values, lut, low, high, valid=None):
    """(H, W) values -> (H, W, 3) uint8 through `lut`, low..high onto its ends (clipped);
    pixels outside `valid` are black."""
    valid = np.ones(values.shape, bool) if valid is None else valid
    t = np.clip((np.where(valid, values, low) - low) / max(high - low, 1e-12), 0, 1)
    rgb = lut[np.rint(t * (len(lut) - 1)).astype(np.int64)]
    rgb[~valid] = 0
    return rgb


def paint(label, palette):
    """(H, W) class ids -> (H, W, 3) in the data set's palette; IGNORE_INDEX is black."""
    ignore = label == data.IGNORE_INDEX
    rgb = palette[np.where(ignore, 0, label)]
    rgb[ignore] = 0
    return rgb


def figure_panels(batch, pred, i, palette, num_classes):
    """The panels of image i of a batch, as rows of (title, (H, W, 3) uint8), or None for an empty
    cell. Row 1, segmentation: input, ground truth, prediction, error (wrong red, right white,
    unlabelled black), entropy / log K (Eq. 3). Row 2, depth: ground truth and prediction on one
    colour scale, |mu - y| on valid pixels, sqrt of the predictive variance (Eq. 10); invalid
    ground truth is black. A task the model lacks has no row; the input opens the first row."""
    mean, std = np.array(data.MEAN)[:, None, None], np.array(data.STD)[:, None, None]
    image = (batch['image'][i].numpy() * std + mean).clip(0, 1)  # undo data.normalize
    rows = [[('input', (image * 255).round().astype(np.uint8).transpose(1, 2, 0))]]  # (3, H, W) -> (H, W, 3)
    if pred.log_probs is not None:
        label, seg = batch['label'][i].numpy(), pred.pred[i].cpu().numpy()
        error = np.full((*label.shape, 3), 255, np.uint8)
        error[seg != label] = WRONG
        error[label == data.IGNORE_INDEX] = 0
        entropy = pred.entropy[i].float().cpu().numpy()
        rows[0] += [('GT segmentation', paint(label, palette)), ('predicted segmentation', paint(seg, palette)),
                    ('segmentation error', error),
                    (f'entropy / log K, max {entropy.max() / math.log(num_classes):.2f}',
                     colorize(entropy, INFERNO, 0, math.log(num_classes)))]
    if pred.depth_mean is not None:
        y, mu = batch['depth'][i].numpy(), pred.depth_mean[i].float().cpu().numpy()
        sigma = pred.depth_var[i].float().cpu().sqrt().numpy()
        valid = (y > 0) & np.isfinite(y)
        both = np.concatenate([y[valid], mu.ravel()])
        low, high = both.min(), both.max()
        error = np.abs(mu - y)
        top = error[valid].max() if valid.any() else 0.0
        panels = [(f'GT depth {low:.1f}-{high:.1f} m', colorize(y, VIRIDIS, low, high, valid)),
                  (f'predicted depth {low:.1f}-{high:.1f} m', colorize(mu, VIRIDIS, low, high)),
                  (f'|mu - y| 0-{top:.2f} m', colorize(error, ERRORS, 0, top, valid)),
                  (f'depth std 0-{sigma.max():.2f} m', colorize(sigma, INFERNO, 0, sigma.max()))]
        if len(rows[0]) == 1:  # depth only: one row after the input
            rows[0] += panels
        else:
            rows.append([None] + panels)
    return rows


FONT = ImageFont.load_default(size=12)  # Pillow's own font: no font files needed
PAD, TITLE_HEIGHT, MIN_PANEL_WIDTH, LEGEND_LINE = 6, 16, 200, 16


def panel_scale(width):
    """Small images are enlarged by an integer factor (nearest) so that titles fit."""
    return max(1, math.ceil(MIN_PANEL_WIDTH / width))


def save_figure(path, rows, legend=()):
    """Draw rows of (title, (H, W, 3) uint8) panels (None = empty cell) as a grid with titles,
    each panel enlarged by panel_scale, and a colour legend [(name, rgb)] below it."""
    h, w = next(p for row in rows for p in row if p is not None)[1].shape[:2]
    s = panel_scale(w)
    cell_w, cell_h = w * s + PAD, TITLE_HEIGHT + h * s + PAD
    width = PAD + max(len(row) for row in rows) * cell_w
    lines, x = [[]], PAD  # the legend, wrapped into lines as wide as the figure
    for name, rgb in legend:
        entry = 14 + FONT.getlength(name) + 12  # swatch, gap, name, space
        if x + entry > width and lines[-1]:
            lines.append([])
            x = PAD
        lines[-1].append((x, name, rgb))
        x += entry
    height = PAD + len(rows) * cell_h + (len(lines) * LEGEND_LINE + PAD if legend else 0)
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel is None:
                continue
            title, pixels = panel
            x, y = PAD + c * cell_w, PAD + r * cell_h
            draw.text((x, y), title, fill='black', font=FONT)
            canvas.paste(Image.fromarray(pixels).resize((w * s, h * s), Image.NEAREST), (x, y + TITLE_HEIGHT))
    top = PAD + len(rows) * cell_h
    for k, line in enumerate(lines if legend else []):
        for x, name, rgb in line:
            y = top + k * LEGEND_LINE
            draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(v) for v in rgb), outline='black')
            draw.text((x + 14, y), name, fill='black', font=FONT)
    canvas.save(path)


def class_legend(batch, pred, i, palette, class_names):
    """(name, colour) of the classes in image i's ground truth or prediction."""
    present = np.union1d(batch['label'][i].unique().numpy(), pred.pred[i].unique().cpu().numpy())
    return [(class_names[k], palette[k]) for k in present if k != data.IGNORE_INDEX]


def _count(n):
    return f'{n / 1e6:.1f}M' if n >= 1e6 else f'{n / 1e3:.0f}k' if n >= 1e4 else str(n)


def reliability_diagram(path, bins, ece):
    """The reliability diagram of the ECE bins: accuracy per bin as bars against the diagonal
    (perfect calibration), the bin's mean confidence as a red tick, its pixel count below."""
    width, height, left, right, top, bottom = 640, 520, 64, 20, 44, 84
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    plot_w, plot_h = width - left - right, height - top - bottom
    px = lambda v: left + v * plot_w  # confidence -> x pixel
    py = lambda v: top + (1 - v) * plot_h  # accuracy -> y pixel
    edges = bins['edges']
    for m, (n, acc, conf) in enumerate(zip(bins['count'], bins['accuracy'], bins['confidence'])):
        x0, x1 = px(edges[m]) + 1, px(edges[m + 1]) - 1
        if n:
            draw.rectangle([x0, py(acc), x1, py(0)], fill=(90, 140, 210), outline=(30, 60, 120))
            draw.line([x0, py(conf), x1, py(conf)], fill=(200, 0, 0), width=3)
        label = _count(n)
        draw.text(((x0 + x1) / 2 - FONT.getlength(label) / 2, py(0) + 22), label, fill='black', font=FONT)
    for k in range(0, 40, 2):  # the diagonal, dashed: 20 dashes
        draw.line([px(k / 40), py(k / 40), px((k + 1) / 40), py((k + 1) / 40)], fill=(90, 90, 90), width=2)
    draw.rectangle([px(0), py(1), px(1), py(0)], outline='black')
    for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.line([px(v), py(0), px(v), py(0) + 4], fill='black')
        draw.text((px(v) - 8, py(0) + 6), f'{v:.1f}', fill='black', font=FONT)
        draw.line([px(0) - 4, py(v), px(0), py(v)], fill='black')
        draw.text((px(0) - 30, py(v) - 7), f'{v:.1f}', fill='black', font=FONT)
    draw.text((px(0.5) - 30, py(0) + 40), 'confidence', fill='black', font=FONT)
    draw.text((6, py(0) + 22), 'pixels', fill='black', font=FONT)
    axis = Image.new('RGB', (60, 14), 'white')
    ImageDraw.Draw(axis).text((0, 0), 'accuracy', fill='black', font=FONT)
    canvas.paste(axis.rotate(90, expand=True), (4, int(py(0.5)) - 30))
    total = sum(bins['count'])
    ece_text = 'nan' if ece is None else f'{ece:.3f}'
    draw.text((left, 8), f'Reliability: ECE {ece_text} over {total} labelled pixels, {len(edges) - 1} bins',
              fill='black', font=FONT)
    draw.text((left, 24), 'bars: accuracy   red: mean confidence   dashed: perfect calibration',
              fill=(60, 60, 60), font=FONT)
    canvas.save(path)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    """Evaluate, print the row (rank 0), write JSON and pictures if asked; returns the result
    dict (the JSON's content, NaN as None) on every rank."""
    args = get_parser().parse_args(argv)
    if args.data != 'synthetic' and not args.root:
        raise ValueError(f'--data {args.data} needs --root, the data set directory')
    models = uq.load_members(args.checkpoints)
    method = resolve_method(args.method, models, args.checkpoints)
    num_classes = data.NUM_CLASSES[args.data]
    if 'seg' in models[0].tasks and models[0].num_classes != num_classes:
        raise ValueError(f'{args.checkpoints[0]} predicts {models[0].num_classes} classes, '
                         f'{args.data} has {num_classes}')
    rank, world_size, device = setup_distributed(torch.device(args.device))
    try:
        result = run(args, models, method, num_classes, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return result


def run(args, models, method, num_classes, rank, world_size, device):
    models = [m.to(device) for m in models]
    model = uq.DeepEnsemble(models) if method == 'de' else models[0]
    dataset = data.build_dataset(args.data, args.root, args.split, train=False, num_images=args.synthetic_images,
                                 size=tuple(args.synthetic_size))
    # each rank evaluates every world_size-th image, no padding: the summed metrics are exact.
    # Its own generator keeps the loader from drawing on the global RNG (the MC Dropout masks)
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), args.batch_size,
                        num_workers=args.workers, pin_memory=device.type == 'cuda', generator=torch.Generator())
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else None
    kwargs = {'samples': args.samples, 'dropout': args.dropout} if method == 'mcd' else {}
    label = args.label or default_label(models, method, args.dropout)
    if rank == 0:
        print(f'{label}: {args.data} {args.split}, {len(dataset)} images, method {method}, '
              f'{world_size} rank(s) on {device}')
        if args.save_vis:
            os.makedirs(args.save_vis, exist_ok=True)

    drawn = []

    def on_batch(batch, pred, seconds):
        if rank != 0 or not args.save_vis:
            return
        for i in range(min(len(batch['name']), args.num_vis - len(drawn))):
            rows = figure_panels(batch, pred, i, data.PALETTES[args.data], num_classes)
            legend = (class_legend(batch, pred, i, data.PALETTES[args.data], data.CLASS_NAMES[args.data])
                      if pred.log_probs is not None else ())
            drawn.append(os.path.join(args.save_vis, f"{batch['name'][i]}.png"))
            save_figure(drawn[-1], rows, legend)

    torch.manual_seed(args.seed + rank)  # MC Dropout masks: repeatable, different on each rank
    metrics = uq.evaluate(model, loader, num_classes, method, device, autocast, on_batch, **kwargs)
    seg = metrics['seg']
    if seg is not None:
        seg = dict(seg, iou=dict(zip(data.CLASS_NAMES[args.data], seg['iou'])),
                   reliability=reliability_bins(metrics['seg_metrics']))
    settings = {k: v for k, v in vars(args).items() if k != 'checkpoints'}
    result = uq.json_safe({'label': label, 'settings': dict(settings, device=str(device), world_size=world_size),
                        'checkpoints': list(args.checkpoints), 'method': method, 'seg': seg,
                        'depth': metrics['depth'], 'time_ms': timing(metrics['times'], args.warmup)})
    if rank == 0:
        print(format_row(result))
        print(format_extras(result))
        if args.json:
            os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=2, allow_nan=False)
        if args.save_vis and seg is not None:
            reliability_diagram(os.path.join(args.save_vis, 'reliability.png'), result['seg']['reliability'],
                                result['seg']['ece'])
        if args.save_vis:
            print(f'wrote {len(drawn)} figure(s) to {args.save_vis}')
    return result


if __name__ == '__main__':
    main()
