"""
Evaluate a trained model and its uncertainty on a data set split: one row of the paper's
Tables 2-7, and on request pictures like its Figure 5 and a reliability diagram.

What is evaluated (uq.py has the methods, metrics.py the metrics; the loop over the data is
`evaluate` below):

    one checkpoint                      the network as it is ('none', the "Baseline" rows), or
                                        with --method mcd --dropout 0.2 --samples 10 (MC Dropout)
    a Deep Sub-Ensemble checkpoint      all its heads ('dse', inferred from the checkpoint)
    several checkpoints                 a Deep Ensemble of them ('de', inferred), run as one
                                        vmap-batched model; they must share one architecture

The row has the paper's columns (Section 4, "Metrics"):

    Semantic Segmentation       mIoU, ECE (15 bins), p(acc/cer), p(unc/inacc), PAvPU
    Monocular Depth Estimation  RMSE (metres), p(acc/cer), p(unc/inacc), PAvPU
    Inference Time [ms]         mean +- std over batches of predict(), after --warmup batches

A second block adds what a reviewer of uncertainty asks for (metrics.SegMetrics, DepthMetrics):
NLL and Brier score; failure detection (AUROC, AUPR of the misclassified pixels by entropy) and
selective prediction (AURC, AUGRC, the risk at 80% coverage and the coverage at 5% risk), from
histograms whose error bound is printed; the summary score RSS; the mean entropy split into its
aleatoric part and the mutual information (Section 2.2); for depth the Gaussian NLL,
sparsification (AUSE, AURG of RMSE, AbsRel and a1, per Poggi et al.), the coverage of the 1-
and 2-sigma intervals, with --calibration the coverage and mean width of calibrate.py's
split-conformal interval, and Eq. 10's two terms. All of it is in the JSON.

Under shift (Section 2.2's epistemic uncertainty should grow where the data are unlike the
training data): --corruption NAME --severity S evaluates on images corrupted as ImageNet-C does
(corrupt.py; labels and depth untouched); --corruption all runs the whole sweep, clean and every
corruption at every severity (51 cells), then a table and a plot of the metrics against
severity. Its files, for --json out/sweep.json:

    out/sweep.json          the summary and every cell
    out/sweep.png           the plot
    out/sweep.cells/        one JSON per finished cell (clean_0.json, fog_3.json, ...), written
                            as it finishes, so that a killed sweep run again with the same
                            command goes on where it stopped

Each cell records every setting that determines its numbers (the checkpoints' SHA-256, the
method and its samples, the data, split, scenes, calibration, max depth, precision, batch size,
device and ranks); a sweep with another setting refuses to reuse the cells and names the
settings that differ, and --overwrite deletes the old cells and starts over. The sweep prints
one line per cell with its progress and ETA, and at the end a summary.
--synthetic-ood adds objects of no training class to the synthetic scenes, and any data set
whose samples carry an 'ood' mask (data.py) gets the out-of-distribution block: AUROC, AUPR
and FPR95 of the entropy, the mutual information and the depth variance as detectors of those
pixels among the in-distribution pixels of the same images.

p(acc/cer) is p(accurate|certain) and p(unc/inacc) is p(uncertain|inaccurate) of Mukhoti & Gal,
with each image's mean uncertainty as the threshold (the tables' header prints the second as
"p(inacc/unc)", but Section 4 defines p(uncertain|inaccurate), which is what is computed). A task
the model lacks prints '-' and is null in the JSON. The depth line below the row adds AbsRel and
delta1..3 (Eq. 13). The time is that of one batch of --batch-size images (1, as in the paper,
makes it the time per image), measured around predict() with the device synchronised; the first
--warmup batches of every rank are left out (allocation, cuDNN autotuning). It includes the
decomposition of the uncertainty, which the second block needs (bench.py times predictions
without it).

    # the single network (method 'none'); --json writes the same numbers
    python evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2 --json out/sdf_b2.json
    # MC Dropout with 20 % dropout and 10 passes
    python evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2 --method mcd --dropout 0.2
    # a Deep Sub-Ensemble (method inferred) and a Deep Ensemble of ten runs (method inferred)
    python evaluate.py runs/dse_b2/best.pt --data nyuv2 --root data/nyuv2
    python evaluate.py runs/sdf_b2_seed*/best.pt --data nyuv2 --root data/nyuv2
    # the CPU demo of train.py, with pictures (one PNG per image, plus reliability.png)
    python evaluate.py runs/demo/best.pt --data synthetic --save-vis out/vis --num-vis 8
    # the calibration baseline (calibrate.py), under shift, and unseen objects
    python evaluate.py runs/demo/best.pt --calibration runs/demo/best.calibration.json
    python evaluate.py runs/demo/best.pt --corruption fog --severity 3
    python evaluate.py runs/demo/best.pt --corruption all --json out/sweep_demo.json
    python evaluate.py runs/demo/best.pt --synthetic-ood --json out/ood_demo.json
    # several GPUs: each rank evaluates every world_size-th image (on the CPU: add --device cpu)
    torchrun --standalone --nproc_per_node=4 evaluate.py runs/sdf_b2/best.pt --data nyuv2 --root data/nyuv2

Under torchrun the ranks share the images without padding duplicates, and the metrics' sums are
added over the ranks before anything is computed, so the row is the one a single process gives
(timing aside). Only rank 0 prints and writes; its pictures show the first --num-vis images of
its own share (images 0, W, 2W, ... with W ranks), named after the samples.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import calibrate
import corrupt
import data
import figures
import heads
import metrics
import plumbing
import uq
from heads import DeepSubEnsemble

DISPLAY_NAMES = {'segformer': 'SegFormer', 'depthformer': 'DepthFormer', 'segdepthformer': 'SegDepthFormer',
                 'dse': 'SegDepthFormer', 'dse-segformer': 'SegFormer', 'dse-depthformer': 'DepthFormer'}


# ---------------------------------------------------------------------------------------------
# the options; a number out of its range is refused where it is parsed, naming the range
# (plumbing's argparse types; argparse puts the option's name in front: "argument --samples:
# 0 is not an integer >= 1")

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('checkpoints', nargs='+', help='checkpoint(s) of train.py or distill.py; several = a Deep Ensemble')
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes; ignored for synthetic)')
    a('--split', default='val', choices=('train', 'val', 'calib'), help='data set split')
    a('--max-depth', type=plumbing.positive_float, help='metres; farther ground truth is invalid (default: data.MAX_DEPTH, '
                                               '10 nyuv2, 80 cityscapes, 10 synthetic)')
    uq.add_method_options(p)
    a('--batch-size', type=plumbing.positive_int, default=1, help='images per predict() call, per rank (1: time per image)')
    a('--workers', type=plumbing.natural_int, default=plumbing.default_workers(),
      help='data loader processes per rank, >= 0 (default: the cores, at most 4)')
    a('--precision', default='auto', choices=plumbing.PRECISIONS,
      help='autocast of the forward passes; auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on a CPU')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu (default: cuda if there is one)')
    a('--warmup', type=plumbing.natural_int, default=5, help='batches per rank left out of the timing')
    a('--calibration', metavar='JSON', help="calibrate.py's temperature and variance scale, applied to a single "
                                            "network (method none or mcd)")
    a('--json', help='write the result here as JSON')
    a('--save-vis', metavar='DIR', help='write Figure-5-like PNGs, reliability.png and sparsification.png here')
    a('--num-vis', type=plumbing.natural_int, default=8, help='images to draw with --save-vis')
    a('--overwrite', action='store_true', help='replace an existing --json file or --save-vis folder; with '
                                               '--corruption all, delete the sweep\'s finished cells and start over')
    a('--name', help='the row\'s name in the table and the JSON; default e.g. "SegDepthFormer-B2 (DE x10)"')
    a('--corruption', choices=[*corrupt.CORRUPTIONS, 'all'],
      help="corrupt the images (only them) as ImageNet-C does (corrupt.py); 'all': the whole sweep, clean "
           "and every corruption at every severity, restartable, its cells in <json without .json>.cells/")
    a('--severity', type=int, choices=range(1, 6), help='of --corruption NAME, 1..5')
    a('--synthetic-ood', action='store_true', help='synthetic only: scenes with objects of no training class, '
                                                   'and the out-of-distribution metrics')
    data.add_split_options(p, default_split='val')
    return p


def synthetic_count(args):
    """The number of synthetic scenes of the split read: --synthetic-train, -val or -calib."""
    return {'train': args.synthetic_train, 'val': args.synthetic_val, 'calib': args.synthetic_calib}[args.split]


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
        raise ValueError(f'{paths[0]} is a Deep Sub-Ensemble ({heads.describe(models[0])}): use --method dse '
                         f'(or leave --method out), not {method!r}')
    if not is_dse and method == 'dse':
        raise ValueError(f'--method dse needs a Deep Sub-Ensemble checkpoint (model dse, dse-segformer or '
                         f'dse-depthformer); {paths[0]} holds {heads.describe(models[0])}')
    if method == 'de':
        raise ValueError(f'--method de needs one checkpoint per member of the Deep Ensemble; got only {paths[0]}')
    return 'dse' if is_dse else method or 'none'


def default_name(models, method, dropout):
    """E.g. 'SegDepthFormer-B2', 'EMUFormer-B0' (a student of distill.py), 'SegFormer-B0 (MCD 20%)',
    'SegDepthFormer-B2 (DE x10)', 'SegDepthFormer-B0 (decoder MCD 20%)'."""
    cfg = models[0].config
    name = 'EMUFormer' if models[0].meta.get('objective') == 'eq11' else DISPLAY_NAMES[cfg['name']]
    base = f"{name}-{cfg['backbone'].upper()}"
    if method == 'mcd':
        return f'{base} (MCD {dropout:.0%})'
    if method == 'mcd-decoder':
        return f'{base} (decoder MCD {dropout:.0%})'
    if method == 'drop-path':
        return f'{base} (test-time drop-path)'
    if method == 'dse':
        return f'{base} (DSE x{models[0].num_members})'
    if method == 'de':
        return f'{base} (DE x{len(models)})'
    return base


# ---------------------------------------------------------------------------------------------
# the evaluation loop

@dataclass
class Pictures:
    """What --save-vis draws while the loop runs: the Figure-5-like panels of the first `count`
    images, one PNG each in `folder`, named after the row and the sample, titled with the row's name."""
    folder: str
    count: int
    name: str
    palette: np.ndarray
    class_names: list
    num_classes: int


def file_stem(name):
    """A row's name as the start of a file name: 'EMUFormer-B0, calibrated' -> 'emuformer-b0-calibrated'."""
    return re.sub(r'[^a-z0-9.]+', '-', name.lower()).strip('-')


def draw_pictures(pictures, batch, pred, count):
    """The panels of the first `count` images of a batch -> the paths of the PNGs written."""
    written = []
    for i in range(min(len(batch['name']), count)):
        rows = figures.prediction_panels(batch['image'], pred, i, pictures.palette, pictures.num_classes,
                                         label=batch['label'], depth=batch['depth'])
        legend = []
        if pred.probs is not None:
            present = np.union1d(batch['label'][i].numpy(), pred.pred[i].cpu().numpy())
            legend = figures.class_legend(present, pictures.palette, pictures.class_names) + figures.ERROR_LEGEND
        written.append(os.path.join(pictures.folder, f"{file_stem(pictures.name)}_{batch['name'][i]}.png"))
        figures.save_figure(written[-1], rows, f"{pictures.name} on {batch['name'][i]}", legend + figures.BLACK_MEANS)
    return written


@torch.no_grad()
def evaluate(model, loader, num_classes, method='none', device='cpu', amp_dtype=None, progress=False,
             pictures=None, **method_kwargs):
    """uq.predict over a loader of sample dicts, every batch added to the metrics (metrics.py).

    amp_dtype: the autocast dtype of the forward passes (plumbing.autocast_dtype), None for fp32.
    progress: print a progress line every few seconds. pictures: a Pictures to draw, or None.
    method_kwargs go to uq.predict (samples, dropout, decompose).
    Returns {'seg': SegMetrics.compute() or None, 'depth': ... or None, 'ood': OODMetrics.compute()
    where the samples carry an 'ood' mask, else None, 'times': [the wall-clock seconds of each
    predict() call, the device synchronised, so GPU time is included], 'drawn': [the pictures'
    paths], 'seg_metrics', 'depth_metrics': the metric objects themselves (their statistics draw
    the reliability diagram and the sparsification plot)}, with the statistics summed over DDP
    ranks first.
    """
    seg = metrics.SegMetrics(num_classes, device=device)
    dep = metrics.DepthMetrics(device=device, interval_scale=getattr(model, 'interval_scale', None))
    ood = metrics.OODMetrics(num_classes, device)
    has, times, drawn, done = set(), [], [], 0
    shown = plumbing.Progress('evaluated', len(loader.sampler), show=progress)
    for batch in loader:
        images = batch['image'].to(device, non_blocking=True)
        plumbing.sync(device)
        start = time.perf_counter()
        with plumbing.autocast(torch.device(device), amp_dtype):
            pred = uq.predict(model, images, method, **method_kwargs)
        plumbing.sync(device)
        times.append(time.perf_counter() - start)
        if pred.probs is not None:
            seg.update(pred.probs, batch['label'].to(device), pred.entropy, pred.aleatoric_entropy,
                       pred.mutual_information)
            has.add('seg')
        if pred.depth_mean is not None:
            dep.update(pred.depth_mean, pred.depth_var, batch['depth'].to(device), pred.aleatoric_var,
                       pred.epistemic_var)
            has.add('depth')
        if 'ood' in batch:  # a single network has no mutual information (it is 0 everywhere)
            ood.update({'entropy': pred.entropy, 'depth_var': pred.depth_var,
                        'mutual_information': pred.mutual_information if method != 'none' else None},
                       batch['ood'].to(device))
            has.add('ood')
        done += len(images)
        shown.update(done)
        if pictures is not None and len(drawn) < pictures.count:
            drawn += draw_pictures(pictures, batch, pred, pictures.count - len(drawn))
    seg.reduce()
    dep.reduce()
    ood.reduce()
    return {'seg': seg.compute() if 'seg' in has else None,
            'depth': dep.compute() if 'depth' in has else None,
            'ood': ood.compute() if 'ood' in has else None,
            'times': times, 'drawn': drawn, 'seg_metrics': seg, 'depth_metrics': dep}


def nothing_counted(result):
    """Notes on the tasks of an evaluation whose metrics had no pixel to count (NaN; null in
    JSON): said out loud, so that a NaN is never read as a result."""
    notes = []
    if result['seg'] is not None and result['seg']['pixels'] == 0:
        notes.append('segmentation: no labelled pixel (every label is IGNORE_INDEX), its metrics are NaN')
    if result['depth'] is not None and result['depth']['pixels'] == 0:
        notes.append('depth: no valid ground-truth depth (data.valid_depth), its metrics are NaN')
    return notes


# ---------------------------------------------------------------------------------------------
# numbers: the reliability bins, timing, the printed row

def reliability_bins(seg):
    """The ECE bins of a metrics.SegMetrics after reduce(): bin m holds the labelled pixels with
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
    after each rank's first `warmup`; the std is over batches, with 1/n. A rank with no more
    batches than `warmup` leaves out all but its last (a time after fewer warm-up batches beats
    no time); 'warmup' is then the fewest any rank left out (format_extras says so)."""
    warmup = max(0, min(warmup, len(times) - 1))
    kept = [1000 * t for t in times[warmup:]]
    warmups = [warmup]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (kept, warmup))
        kept, warmups = [t for k, _ in gathered for t in k], [w for _, w in gathered]
    kept = np.array(kept)
    return {'mean': kept.mean() if kept.size else math.nan, 'std': kept.std() if kept.size else math.nan,
            'n': int(kept.size), 'warmup': min(warmups)}


# (task, key, header) of the paper's columns, in the order of Tables 2-7
COLUMNS = [('seg', 'miou', 'mIoU'), ('seg', 'ece', 'ECE'), ('seg', 'p_accurate_certain', 'p(acc/cer)'),
           ('seg', 'p_uncertain_inaccurate', 'p(unc/inacc)'), ('seg', 'pavpu', 'PAvPU'),
           ('depth', 'rmse', 'RMSE'), ('depth', 'p_accurate_certain', 'p(acc/cer)'),
           ('depth', 'p_uncertain_inaccurate', 'p(unc/inacc)'), ('depth', 'pavpu', 'PAvPU')]


def _number(value, digits=3):
    return 'nan' if value is None else f'{value:.{digits}f}'  # None: NaN after plumbing.json_safe


def format_row(result):
    """Three lines: the task groups, the paper's column headers and the row of a json_safe result
    ('-' for a task the model lacks, 'nan' for a metric with nothing to count)."""
    first = max(len(result['name']), 20)
    widths = [max(len(header), 6) for _, _, header in COLUMNS]
    cells = [_number(result[task][key]) if result[task] else '-' for task, key, _ in COLUMNS]
    time_cell = f"{_number(result['time_ms']['mean'], 2)} +- {_number(result['time_ms']['std'], 2)}"
    seg_width, depth_width = sum(w + 2 for w in widths[:5]), sum(w + 2 for w in widths[5:])
    groups = ' ' * (first + 2) + f"{'Semantic Segmentation':{seg_width}}{'Monocular Depth Estimation':{depth_width}}"
    header = ' ' * first + ''.join(f'  {h:>{w}}' for (_, _, h), w in zip(COLUMNS, widths))
    row = f"{result['name']:{first}}" + ''.join(f'  {c:>{w}}' for c, w in zip(cells, widths))
    header, row = header + '  Inference Time [ms]', row + f'  {time_cell:>19}'
    return '\n'.join([groups.rstrip(), header, row])


def format_extras(result):
    """The numbers outside the paper's columns: pixel accuracy, AbsRel, delta1..3, how timed,
    and a note for every metric that had nothing to count."""
    lines = []
    if result['seg']:
        lines.append(f"segmentation: pixel accuracy {_number(result['seg']['pixel_acc'])}")
    if result['depth']:
        d = result['depth']
        lines.append(f"depth: AbsRel {_number(d['abs_rel'])}  delta1 {_number(d['delta1'])}  "
                     f"delta2 {_number(d['delta2'])}  delta3 {_number(d['delta3'])}")
    t, s = result['time_ms'], result['settings']
    lines.append(f"time: {t['n']} batches of {s['batch_size']} image(s) on {s['device']} ({s['precision']}), "
                 f"after {t['warmup']} warm-up batches on each of {s['world_size']} rank(s)"
                 + (f" (--warmup {s['warmup']} asked, but a rank had only {t['warmup'] + 1} batches)"
                    if t['warmup'] < s['warmup'] else ''))
    lines += [f'note: {note}' for note in nothing_counted(result)]
    return '\n'.join(lines)


# (task, key, header) of the second block: the uncertainty metrics beyond the paper's columns
UNCERTAINTY_COLUMNS = {
    'seg': [('nll', 'NLL'), ('brier', 'Brier'), ('auroc_failure', 'AUROC fail'), ('aupr_failure', 'AUPR fail'),
            ('aurc', 'AURC'), ('augrc', 'AUGRC'), ('entropy_mean', 'H mean'), ('aleatoric_mean', 'aleatoric'),
            ('mutual_information_mean', 'MI')],
    'depth': [('nll', 'NLL'), ('ause_rmse', 'AUSE rmse'), ('ause_absrel', 'AUSE absrel'), ('ause_a1', 'AUSE a1'),
              ('aurg_rmse', 'AURG rmse'), ('aurg_absrel', 'AURG absrel'), ('aurg_a1', 'AURG a1'),
              ('coverage_1sigma', 'cov 1s'), ('coverage_2sigma', 'cov 2s'), ('aleatoric_var_mean', 'aleat var'),
              ('epistemic_var_mean', 'epist var')],
}
# selective prediction's operating points, RSS and the conformal depth interval: compare.py's
# fourth table (evaluate.py prints them as sentences below the second block)
OPERATING_COLUMNS = [('seg', 'risk_at_80', f'seg risk at {metrics.RISK_AT_COVERAGE:.0%} coverage'),
                     ('seg', 'coverage_at_5', f'seg coverage at {metrics.COVERAGE_AT_RISK:.0%} risk'),
                     ('seg', 'rss', 'seg RSS'), ('depth', 'interval_coverage', 'depth interval coverage'),
                     ('depth', 'interval_width', 'depth interval width (m)')]


def format_ood(result):
    """Out-of-distribution detection: per score, AUROC, AUPR and FPR95 (metrics.OODMetrics)."""
    lines = [f"{'out-of-distribution pixels':28}{'AUROC':>8}{'AUPR':>8}{'FPR95':>8}   "
             f"(OOD {next(v['ood_pixels'] for v in result['ood'].values() if v)} of "
             f"{next(v['pixels'] for v in result['ood'].values() if v)} pixels)"]
    for score, v in result['ood'].items():
        cells = [_number(v[k]) for k in ('auroc', 'aupr', 'fpr95')] if v else ['-'] * 3
        lines.append(f'  {score:26}' + ''.join(f'{c:>8}' for c in cells))
    return '\n'.join(lines)


def format_uncertainty(result):
    """The second block: per task, the scoring rules, failure detection, selective prediction,
    sparsification, calibration of the variance and the two kinds of uncertainty (metrics.SegMetrics,
    metrics.DepthMetrics), one header line and one row each; below them the histogram's error
    bounds, selective prediction's two operating points and RSS, and with --calibration the
    depth interval's coverage and width."""
    lines = []
    for task, title in (('seg', 'segmentation uncertainty'), ('depth', 'depth uncertainty')):
        if not result[task]:
            continue
        columns = UNCERTAINTY_COLUMNS[task]
        widths = [max(len(h), 7) for _, h in columns]
        lines.append(f'{title:26}' + ''.join(f'  {h:>{w}}' for (_, h), w in zip(columns, widths)))
        lines.append(f"{'':26}" + ''.join(f'  {_number(result[task][k]):>{w}}' for (k, _), w in zip(columns, widths)))
    if result['seg']:
        bounds = ', '.join(f"{k} {result['seg'][k + '_bound']:.1e}" for k in ('auroc_failure', 'aupr_failure', 'aurc',
                                                                               'augrc', 'risk_at_80', 'coverage_at_5')
                           if result['seg'].get(k + '_bound') is not None)
        lines.append(f'  (from a histogram of {metrics.SCORE_BINS} entropy bins; largest possible error: {bounds})')
        seg = result['seg']
        lines.append(f"  selective prediction: risk {_number(seg['risk_at_80'])} at {metrics.RISK_AT_COVERAGE:.0%} "
                     f"of the pixels accepted, {_number(seg['coverage_at_5'])} of them accepted at "
                     f"{metrics.COVERAGE_AT_RISK:.0%} risk; RSS {_number(seg['rss'])}")
    interval = result['depth'] and result['depth'].get('interval_coverage')
    if interval is not None and not math.isnan(interval):  # None: NaN after plumbing.json_safe
        depth = result['depth']
        lines.append(f"  depth interval (calibrate.py, split conformal): coverage {_number(depth['interval_coverage'])}, "
                     f"mean width {_number(depth['interval_width'])} m")
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------

def sparsification_plot(path, depth, name):
    """The mean sparsification curves (Poggi et al.) of RMSE, AbsRel and the outlier fraction
    1 - a1: the metric left after removing the most uncertain pixels, against the oracle that
    removes the most wrong ones and against random removal; AUSE is the area between the
    first two."""
    panels = []
    for metric, title in (('rmse', 'RMSE (m)'), ('absrel', 'AbsRel'), ('a1', 'outliers, 1 - a1')):
        c = depth['sparsification_curves'][metric]
        panels.append((f"{title}: AUSE {_number(depth['ause_' + metric])}", 'fraction of pixels removed',
                       title, [('by uncertainty', c['x'], c['curve']), ('oracle (by error)', c['x'], c['oracle']),
                               ('random', c['x'], c['random'])]))
    figures.line_plots(path, panels, f'{name}: sparsification, the mean over images')


# ---------------------------------------------------------------------------------------------
# one evaluation

def evaluate_split(args, model, method, name, num_classes, rank, world_size, device, corruption=None,
                   pictures=None, progress=False):
    """One evaluation of the split (corrupted if asked) -> the result dict (the JSON's content)."""
    dataset = data.build_dataset(args.data, args.root, args.split, train=False, max_depth=args.max_depth,
                                 corruption=corruption, num_images=synthetic_count(args),
                                 size=tuple(args.synthetic_size), ood=args.synthetic_ood)
    loader = plumbing.eval_loader(dataset, args.batch_size, args.workers, rank, world_size, device)
    kwargs = dict({k: getattr(args, k) for k in uq.METHOD_OPTIONS.get(method, ())}, decompose=True)
    torch.manual_seed(args.seed + rank)  # the sampling methods' masks: repeatable, different on each rank
    measured = evaluate(model, loader, num_classes, method, device, plumbing.autocast_dtype(args.precision, device),
                        progress, pictures, **kwargs)
    seg, depth = measured['seg'], measured['depth']
    if seg is not None:
        seg = dict(seg, iou=dict(zip(data.CLASS_NAMES[args.data], seg['iou'])),
                   reliability=reliability_bins(measured['seg_metrics']))
    if depth is not None:
        depth = dict(depth, sparsification_curves=measured['depth_metrics'].sparsification_curves())
    settings = {k: v for k, v in vars(args).items() if k != 'checkpoints'}
    return plumbing.json_safe({
        'name': name, 'settings': dict(settings, device=str(device), world_size=world_size,
                                       corruption=corruption and list(corruption)),
        'checkpoints': list(args.checkpoints), 'method': method, 'seg': seg, 'depth': depth, 'ood': measured['ood'],
        'time_ms': timing(measured['times'], args.warmup), 'drawn': measured['drawn']})


def evaluate_and_report(args, model, method, name, num_classes, rank, world_size, device):
    """One evaluation, printed (rank 0), written to --json and drawn into --save-vis."""
    corruption = (args.corruption, args.severity) if args.corruption else None
    if rank == 0:
        print(f'{name}: {args.data} {args.split}' + (f', {corruption[0]} at severity {corruption[1]}' if corruption else '')
              + f', method {method}, {world_size} rank(s) on {device}')
    pictures = None
    if rank == 0 and args.save_vis:
        pictures = Pictures(args.save_vis, args.num_vis, name, data.PALETTES[args.data], data.CLASS_NAMES[args.data],
                            num_classes)
    result = evaluate_split(args, model, method, name, num_classes, rank, world_size, device, corruption, pictures,
                            progress=rank == 0)
    if rank == 0:
        print(format_row(result))
        print(format_extras(result))
        print(format_uncertainty(result))
        if result['ood'] is not None:
            print(format_ood(result))
        if args.json:
            plumbing.write_json(result, args.json)
        if pictures is not None:
            drawn = list(result['drawn'])
            if result['seg'] is not None:
                drawn.append(os.path.join(args.save_vis, f'{file_stem(name)}_reliability.png'))
                figures.reliability_diagram(drawn[-1], result['seg']['reliability'], result['seg']['ece'], name)
            if result['depth'] is not None:
                drawn.append(os.path.join(args.save_vis, f'{file_stem(name)}_sparsification.png'))
                sparsification_plot(drawn[-1], result['depth'], name)
            print(f"wrote {len(drawn)} figure(s) to {args.save_vis}: {', '.join(os.path.basename(d) for d in drawn)}")
    return result


# ---------------------------------------------------------------------------------------------
# the corruption sweep: clean, then every corruption at every severity

# what the sweep follows against severity: accuracy, calibration, failure detection, uncertainty,
# and the conformal depth interval (of a model evaluated with --calibration only)
INTERVAL_METRICS = [('depth', 'interval_coverage', 'interval coverage'), ('depth', 'interval_width', 'interval width')]
SWEEP_METRICS = [('seg', 'miou', 'mIoU'), ('seg', 'ece', 'ECE'), ('seg', 'auroc_failure', 'AUROC fail'),
                 ('seg', 'entropy_mean', 'entropy'), ('depth', 'rmse', 'RMSE'), ('depth', 'ause_rmse', 'AUSE rmse'),
                 ('depth', 'nll', 'depth NLL'), ('depth', 'variance_mean', 'depth var'), *INTERVAL_METRICS]


def sweep_cells():
    """('clean', 0), then (corruption, severity) for every corruption and severity 1..5."""
    return [('clean', 0)] + [(c, s) for c in corrupt.CORRUPTIONS for s in range(1, 6)]


def sha256(path):
    """The SHA-256 of a file's bytes, as hex: what identifies a checkpoint wherever it lies."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def sweep_settings(args, method, device, world_size):
    """Everything that determines the numbers of a sweep's cells, recorded in each cell: the
    checkpoints (by content), the method (and a sampling method's options and seed), the data,
    the calibration (by content), the resolved max depth and precision, the batch size, the
    device type and the number of ranks (the samples' masks are seeded per rank)."""
    precision = {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[plumbing.autocast_dtype(args.precision,
                                                                                                        device)]
    settings = {'checkpoints': [sha256(p) for p in args.checkpoints], 'method': method,
                'data': args.data, 'root': args.root and os.path.abspath(args.root), 'split': args.split,
                'max_depth': args.max_depth or data.MAX_DEPTH[args.data],
                'calibration': args.calibration and sha256(args.calibration),
                'precision': precision, 'batch_size': args.batch_size, 'device': device.type, 'world_size': world_size}
    if method in uq.METHOD_OPTIONS:
        settings.update({k: getattr(args, k) for k in uq.METHOD_OPTIONS[method]}, seed=args.seed)
    if args.data == 'synthetic':
        settings.update(synthetic_scenes=synthetic_count(args), synthetic_size=list(args.synthetic_size),
                        synthetic_ood=args.synthetic_ood)
    return settings


def difference(key, then, now):
    """One differing setting, for the message; files (SHA-256s) are named by their short digests."""
    if key in ('checkpoints', 'calibration'):
        short = lambda digests: digests and ([d[:12] for d in digests] if isinstance(digests, list) else digests[:12])
        return f'{key} {short(then)} (now {short(now)}, by SHA-256)'
    return f'{key} {then} (now {now})'


def finished_cells(cells_dir, settings):
    """The cells of an earlier run of this sweep {(corruption, severity): result}, each checked
    against `settings`: a cell made with other settings is refused, naming those that differ."""
    results = {}
    for name, severity in sweep_cells():
        path = os.path.join(cells_dir, f'{name}_{severity}.json')
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                cell = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'{path}: cannot read this sweep cell ({e}); pass --overwrite to start the sweep over')
        made_with = cell.get('determined_by') if isinstance(cell, dict) else None
        if made_with is None:
            raise ValueError(f'{path} records no settings (an older evaluate.py made it); pass --overwrite to start '
                             f'the sweep over, or give this one another --json')
        differ = [difference(k, made_with.get(k), v) for k, v in settings.items() if made_with.get(k) != v]
        if differ:
            raise ValueError(f'{cells_dir} holds cells of a sweep with other settings: {"; ".join(differ)}; run it '
                             f'with those, pass --overwrite to start over, or give this one another --json')
        results[name, severity] = cell
    return results


def sweep(args, model, method, name, num_classes, rank, world_size, device):
    """Evaluate every cell of sweep_cells, each written at once to <json without .json>.cells/
    <corruption>_<severity>.json with the settings that determine it (sweep_settings), so that a
    killed sweep, run again with the same command, goes on where it stopped; cells of other
    settings are refused, and --overwrite deletes them first. One line per evaluated cell with
    its metrics (the interval's only with --calibration), the sweep's progress and ETA (the mean
    time of the cells evaluated so far, times the cells left). Then the summary: every metric of
    SWEEP_METRICS per severity, averaged over the corruptions, as JSON (--json), and those it
    measured (measured) as a table and a plot (<json without .json>.png)."""
    cells_dir, plot = os.path.splitext(args.json)[0] + '.cells', os.path.splitext(args.json)[0] + '.png'
    if args.overwrite and rank == 0 and os.path.isdir(cells_dir):
        shutil.rmtree(cells_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank reads the cells before rank 0 has deleted them
    plumbing.check_output(cells_dir, '--json (its cells)', overwrite=True, folder=True)
    settings = sweep_settings(args, method, device, world_size)
    results = finished_cells(cells_dir, settings)
    todo = [cell for cell in sweep_cells() if cell not in results]
    if rank == 0:
        print(f'sweep of {name}: {len(sweep_cells())} cells (clean, then {len(corrupt.CORRUPTIONS)} corruptions x 5 '
              f'severities), {len(results)} already in {cells_dir}, {len(todo)} to evaluate', flush=True)
    shown = [m for m in SWEEP_METRICS if args.calibration or m not in INTERVAL_METRICS]  # in each cell's line
    start = time.perf_counter()
    for done, (corruption, severity) in enumerate(todo, 1):
        cell = None if corruption == 'clean' else (corruption, severity)
        row = evaluate_split(args, model, method, name, num_classes, rank, world_size, device, cell)
        results[corruption, severity] = dict(row, determined_by=settings)
        if rank == 0:
            plumbing.write_json(results[corruption, severity], os.path.join(cells_dir, f'{corruption}_{severity}.json'))
            each = (time.perf_counter() - start) / done
            print(f'cell {sweep_cells().index((corruption, severity)) + 1}/{len(sweep_cells())} {corruption} {severity}: '
                  + '  '.join(f'{h} {_number((row[task] or {}).get(key))}' for task, key, h in shown)
                  + f' | {done}/{len(todo)} evaluated, {each:.1f} s each, eta {plumbing.format_duration(each * (len(todo) - done))}',
                  flush=True)
    report = plumbing.json_safe({'name': name, 'method': method, 'checkpoints': list(args.checkpoints),
                                 'determined_by': settings, 'summary': sweep_summary(results),
                                 'cells': {f'{n}_{s}': results[n, s] for n, s in sweep_cells()}})
    if rank == 0:
        print(format_sweep(report))
        plumbing.write_json(report, args.json)
        sweep_plot(plot, [report])
        print(f'sweep done: {len(todo)} evaluated in {plumbing.format_duration(time.perf_counter() - start)}, '
              f'{len(sweep_cells()) - len(todo)} reused; wrote {args.json}, {plot} and {cells_dir}/')
    return report


def sweep_summary(results):
    """{header: [value at severity 0 (clean), mean over the corruptions at severity 1, .., 5]}."""
    summary = {}
    for task, key, header in SWEEP_METRICS:
        value = lambda r: (r[task] or {}).get(key)
        values = [value(results['clean', 0])]
        for s in range(1, 6):
            cells = [value(results[c, s]) for c in corrupt.CORRUPTIONS]
            values.append(None if None in cells else sum(cells) / len(cells))
        summary[header] = values
    return summary


def measured(reports):
    """The headers of SWEEP_METRICS that some report has a value of: a metric that no sweep
    measured (the depth interval's, without --calibration) gets no column and no panel."""
    return [h for *_, h in SWEEP_METRICS if any(v is not None for r in reports for v in r['summary'].get(h, []))]


def format_sweep(report):
    """The summary as a table: one line per severity (0 = clean), one column per metric it has."""
    headers = measured([report])
    widths = [max(11, len(h) + 2) for h in headers]
    lines = [f"{report['name']}: the mean over {len(corrupt.CORRUPTIONS)} corruptions at each severity",
             f"{'severity':>9}" + ''.join(f'{h:>{w}}' for h, w in zip(headers, widths))]
    for s in range(6):
        lines.append(f'{s:>9}' + ''.join(f'{_number(report["summary"][h][s]):>{w}}' for h, w in zip(headers, widths)))
    return '\n'.join(lines)


# the unit of a sweep metric, on its panel's y axis (the rest are ratios)
SWEEP_UNITS = {'entropy': 'nats', 'RMSE': 'm', 'AUSE rmse': 'm', 'depth NLL': 'nats', 'depth var': 'm^2',
               'interval width': 'm'}


def sweep_plot(path, reports):
    """Every metric of SWEEP_METRICS that a report has (measured) against severity, one panel
    each, one line per report (no points where a sweep lacks the metric)."""
    panels = [(header, 'severity (0: clean)', f'{header} ({SWEEP_UNITS[header]})' if header in SWEEP_UNITS else header,
               [(r['name'], list(range(6)), r['summary'].get(header, [None] * 6)) for r in reports])
              for header in measured(reports)]
    figures.line_plots(path, panels, 'the mean over the corruptions of ImageNet-C at each severity')


def main(argv=None):
    """Evaluate, print the row (rank 0), write JSON and pictures if asked; returns the result
    dict (the JSON's content, NaN as None) on every rank. Every input and output is checked
    before the evaluation starts."""
    args = get_parser().parse_args(argv)
    if args.data != 'synthetic' and not args.root:
        raise ValueError(f'--data {args.data} needs --root, the data set directory')
    if args.corruption == 'all' and not args.json:
        raise ValueError('--corruption all needs --json: the sweep keeps its finished cells beside it')
    if args.corruption not in (None, 'all') and args.severity is None:
        raise ValueError(f'--corruption {args.corruption} needs --severity 1..5')
    if args.severity is not None and args.corruption in (None, 'all'):
        raise ValueError(f'--severity {args.severity} needs --corruption NAME (one of {", ".join(corrupt.CORRUPTIONS)}); '
                         f'--corruption all runs every severity')
    if args.json:
        plumbing.check_output(args.json, '--json', args.overwrite)
    if args.save_vis:
        plumbing.check_output(args.save_vis, '--save-vis', args.overwrite, folder=True)
    models = heads.load_members(args.checkpoints)
    method = resolve_method(args.method, models, args.checkpoints)
    if args.calibration:
        if method not in ('none', 'mcd'):
            raise ValueError(f'--calibration is the baseline of a single network (method none or mcd), not {method}')
        models = [calibrate.load_calibration(args.calibration, models[0])]
    num_classes = data.NUM_CLASSES[args.data]
    if 'seg' in models[0].tasks and models[0].num_classes != num_classes:
        raise ValueError(f'{args.checkpoints[0]} predicts {models[0].num_classes} classes, '
                         f'{args.data} has {num_classes}')
    with plumbing.process_group(torch.device(args.device)) as (rank, world_size, device):
        models = [m.to(device) for m in models]
        model = uq.DeepEnsemble(models) if method == 'de' else models[0]
        name = args.name or default_name(models, method, args.dropout) + (', calibrated' if args.calibration else '')
        if args.corruption == 'all':
            return sweep(args, model, method, name, num_classes, rank, world_size, device)
        return evaluate_and_report(args, model, method, name, num_classes, rank, world_size, device)


if __name__ == '__main__':
    plumbing.entry_point(main)
