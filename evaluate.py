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

A second block adds what a reviewer of uncertainty asks for (uq.SegMetrics, uq.DepthMetrics):
NLL and Brier score; failure detection (AUROC, AUPR of the misclassified pixels by entropy) and
selective prediction (AURC, AUGRC), from histograms whose error bound is printed; the mean
entropy split into its aleatoric part and the mutual information (Section 2.2); for depth the
Gaussian NLL, sparsification (AUSE, AURG of RMSE, AbsRel and a1, per Poggi et al.), the
coverage of the 1- and 2-sigma intervals, and Eq. 10's two terms. All of it is in the JSON.

Under shift (Section 2.2's epistemic uncertainty should grow where the data are unlike the
training data): --corruption NAME --severity S evaluates on images corrupted as ImageNet-C does
(corrupt.py; labels and depth untouched); --corruption all runs the whole sweep, clean and every
corruption at every severity, each cell written beside --json as it finishes, so that a killed
sweep goes on where it stopped, then a table and a plot of the metrics against severity.
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
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import calibrate
import corrupt
import data
import figures
import heads
import plumbing
import uq
from heads import DeepSubEnsemble

DISPLAY_NAMES = {'segformer': 'SegFormer', 'depthformer': 'DepthFormer', 'segdepthformer': 'SegDepthFormer',
                 'dse': 'SegDepthFormer', 'dse-segformer': 'SegFormer', 'dse-depthformer': 'DepthFormer'}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('checkpoints', nargs='+', help='checkpoint(s) of train.py or distill.py; several = a Deep Ensemble')
    a('--data', default='synthetic', choices=sorted(data.NUM_CLASSES), help='data set')
    a('--root', help='data set root (nyuv2, cityscapes; ignored for synthetic)')
    a('--split', default='val', choices=('train', 'val', 'calib'), help='data set split')
    a('--max-depth', type=float, help='metres; farther ground truth is invalid (default: data.MAX_DEPTH, '
                                      '10 nyuv2, 80 cityscapes, 10 synthetic)')
    a('--method', choices=uq.METHODS,
      help="uncertainty method; default: 'de' for several checkpoints, 'dse' for a Deep Sub-Ensemble, else 'none'")
    a('--samples', type=int, default=10, help='MC Dropout: forward passes')
    a('--dropout', type=float, default=0.2, help='MC Dropout: dropout rate at test time (the paper: 0.2, 0.5)')
    a('--batch-size', type=int, default=1, help='images per predict() call, per rank (1: time per image)')
    a('--workers', type=int, default=plumbing.default_workers(),
      help='data loader processes per rank (default: the cores, at most 4)')
    a('--precision', default='fp32', choices=plumbing.PRECISIONS, help='autocast of the forward passes')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu (default: cuda if there is one)')
    a('--warmup', type=int, default=5, help='batches per rank left out of the timing')
    a('--seed', type=int, default=0, help='seed of the MC Dropout masks (plus the rank)')
    a('--calibration', metavar='JSON', help="calibrate.py's temperature and variance scale, applied to a single "
                                            "network (method none or mcd)")
    a('--json', help='write the result here as JSON')
    a('--save-vis', metavar='DIR', help='write Figure-5-like PNGs and reliability.png here')
    a('--num-vis', type=int, default=8, help='images to draw with --save-vis')
    a('--overwrite', action='store_true', help='replace an existing --json file or --save-vis folder')
    a('--label', help='row label; default e.g. "SegDepthFormer-B2 (DE x10)"')
    a('--corruption', choices=[*corrupt.CORRUPTIONS, 'all'],
      help="corrupt the images (only them) as ImageNet-C does (corrupt.py); 'all': the whole sweep, clean "
           "and every corruption at every severity, restartable, written beside --json")
    a('--severity', type=int, choices=range(1, 6), help='of --corruption, 1..5')
    a('--synthetic-ood', action='store_true', help='synthetic only: scenes with objects of no training class, '
                                                   'and the out-of-distribution metrics')
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
        raise ValueError(f'{paths[0]} is a Deep Sub-Ensemble ({heads.describe(models[0])}): use --method dse '
                         f'(or leave --method out), not {method!r}')
    if not is_dse and method == 'dse':
        raise ValueError(f'--method dse needs a Deep Sub-Ensemble checkpoint (model dse, dse-segformer or '
                         f'dse-depthformer); {paths[0]} holds {heads.describe(models[0])}')
    if method == 'de':
        raise ValueError(f'--method de needs one checkpoint per member of the Deep Ensemble; got only {paths[0]}')
    return 'dse' if is_dse else method or 'none'


def default_label(models, method, dropout):
    """E.g. 'SegDepthFormer-B2', 'EMUFormer-B0' (a student of distill.py), 'SegFormer-B0 (MCD 20%)',
    'SegDepthFormer-B2 (DE x10)'."""
    cfg = models[0].config
    name = 'EMUFormer' if models[0].meta.get('objective') == 'eq11' else DISPLAY_NAMES[cfg['name']]
    label = f"{name}-{cfg['backbone'].upper()}"
    if method == 'mcd':
        return f'{label} (MCD {dropout:.0%})'
    if method == 'dse':
        return f'{label} (DSE x{models[0].num_members})'
    if method == 'de':
        return f'{label} (DE x{len(models)})'
    return label


# ---------------------------------------------------------------------------------------------
# numbers: the reliability bins, timing, the printed row

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
    lines += [f'note: {note}' for note in uq.nothing_counted(result)]
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


def format_ood(result):
    """Out-of-distribution detection: per score, AUROC, AUPR and FPR95 (uq.OODMetrics)."""
    lines = [f"{'out-of-distribution pixels':28}{'AUROC':>8}{'AUPR':>8}{'FPR95':>8}   "
             f"(OOD {next(v['ood_pixels'] for v in result['ood'].values() if v)} of "
             f"{next(v['pixels'] for v in result['ood'].values() if v)} pixels)"]
    for score, v in result['ood'].items():
        cells = [_number(v[k]) for k in ('auroc', 'aupr', 'fpr95')] if v else ['-'] * 3
        lines.append(f'  {score:26}' + ''.join(f'{c:>8}' for c in cells))
    return '\n'.join(lines)


def format_uncertainty(result):
    """The second block: per task, the scoring rules, failure detection, selective prediction,
    sparsification, calibration of the variance and the two kinds of uncertainty (uq.SegMetrics,
    uq.DepthMetrics), one header line and one row each; the histogram's error bounds below."""
    lines = []
    for task, title in (('seg', 'segmentation uncertainty'), ('depth', 'depth uncertainty')):
        if not result[task]:
            continue
        columns = UNCERTAINTY_COLUMNS[task]
        widths = [max(len(h), 7) for _, h in columns]
        lines.append(f'{title:26}' + ''.join(f'  {h:>{w}}' for (_, h), w in zip(columns, widths)))
        lines.append(f"{'':26}" + ''.join(f'  {_number(result[task][k]):>{w}}' for (k, _), w in zip(columns, widths)))
    if result['seg']:
        bounds = ', '.join(f"{k} {result['seg'][k + '_bound']:.1e}" for k in ('auroc_failure', 'aupr_failure', 'aurc', 'augrc')
                           if result['seg'][k + '_bound'] is not None)
        lines.append(f'  (from a histogram of {uq.SCORE_BINS} entropy bins; largest possible error: {bounds})')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------

def sparsification_plot(path, depth, label):
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
    figures.line_plots(path, panels, f'{label}: sparsification, the mean over images')


class Figures:
    """What is drawn after each batch on rank 0 with --save-vis: the Figure-5-like panels of
    its first --num-vis images, one PNG each, named after the samples."""

    def __init__(self, folder, count, label, palette, class_names, num_classes):
        self.folder, self.count, self.label = folder, count, label
        self.palette, self.class_names, self.num_classes = palette, class_names, num_classes
        self.drawn = []

    def __call__(self, batch, pred):
        for i in range(min(len(batch['name']), self.count - len(self.drawn))):
            rows = figures.prediction_panels(batch['image'], pred, i, self.palette, self.num_classes,
                                             label=batch['label'], depth=batch['depth'])
            legend = []
            if pred.probs is not None:
                present = np.union1d(batch['label'][i].numpy(), pred.pred[i].cpu().numpy())
                legend = figures.class_legend(present, self.palette, self.class_names) + figures.ERROR_LEGEND
            self.drawn.append(os.path.join(self.folder, f"{batch['name'][i]}.png"))
            figures.save_figure(self.drawn[-1], rows, f"{self.label} on {batch['name'][i]}",
                                legend + figures.BLACK_MEANS)


class AfterBatch:
    """What evaluate.py does after each batch: the progress line (rank 0), and the figures if
    asked (a Figures, or None)."""

    def __init__(self, total, rank, drawing):
        self.progress = plumbing.Progress('evaluated', total, show=rank == 0)
        self.done, self.drawing = 0, drawing

    def __call__(self, batch, pred, seconds):
        self.done += len(batch['name'])
        self.progress.update(self.done)
        if self.drawing is not None:
            self.drawing(batch, pred)


# ---------------------------------------------------------------------------------------------
# the corruption sweep: clean, then every corruption at every severity

# what the sweep follows against severity: accuracy, calibration, failure detection, uncertainty
SWEEP_METRICS = [('seg', 'miou', 'mIoU'), ('seg', 'ece', 'ECE'), ('seg', 'auroc_failure', 'AUROC fail'),
                 ('seg', 'entropy_mean', 'entropy'), ('depth', 'rmse', 'RMSE'), ('depth', 'ause_rmse', 'AUSE rmse'),
                 ('depth', 'nll', 'depth NLL'), ('depth', 'variance_mean', 'depth var')]


def sweep_cells():
    """('clean', 0), then (corruption, severity) for every corruption and severity 1..5."""
    return [('clean', 0)] + [(c, s) for c in corrupt.CORRUPTIONS for s in range(1, 6)]


def run_sweep(args, model, method, label, num_classes, rank, world_size, device):
    """Evaluate every cell of sweep_cells, each written at once to <json>.cells/<cell>.json, so a
    killed sweep, run again with the same command, goes on where it stopped; a cell written by
    other checkpoints or another method is refused. Then the summary: every metric of
    SWEEP_METRICS per severity, averaged over the corruptions, as JSON (--json), a table and a
    plot (<json without .json>.png)."""
    cells_dir = os.path.splitext(args.json)[0] + '.cells'
    plumbing.check_output(cells_dir, '--json (its cells)', overwrite=True, folder=True)
    results = {}
    for k, (name, severity) in enumerate(sweep_cells()):
        path = os.path.join(cells_dir, f'{name}_{severity}.json')
        if os.path.exists(path):
            with open(path) as f:
                results[name, severity] = json.load(f)
            if (results[name, severity]['checkpoints'], results[name, severity]['method']) != (list(args.checkpoints), method):
                raise ValueError(f'{path} holds a cell of another sweep ({results[name, severity]["checkpoints"]}); '
                                 f'give this one another --json')
            continue
        corruption = None if name == 'clean' else (name, severity)
        results[name, severity] = evaluate_split(args, model, method, label, num_classes, rank, world_size, device,
                                                 corruption)
        if rank == 0:
            plumbing.write_json(results[name, severity], path)
            row = results[name, severity]
            print(f'cell {k + 1}/{len(sweep_cells())} {name} {severity}: '
                  + '  '.join(f'{header} {_number((row[task] or {}).get(key))}' for task, key, header in SWEEP_METRICS))
    summary = sweep_summary(results)
    report = plumbing.json_safe({'label': label, 'method': method, 'checkpoints': list(args.checkpoints),
                                 'summary': summary, 'cells': {f'{n}_{s}': r for (n, s), r in results.items()}})
    if rank == 0:
        print(format_sweep(report))
        plumbing.write_json(report, args.json)
        sweep_plot(os.path.splitext(args.json)[0] + '.png', [report])
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


def format_sweep(report):
    """The summary as a table: one line per severity (0 = clean), one column per metric."""
    headers = list(report['summary'])
    lines = [f"{report['label']}: the mean over {len(corrupt.CORRUPTIONS)} corruptions at each severity",
             f"{'severity':>9}" + ''.join(f'{h:>11}' for h in headers)]
    for s in range(6):
        lines.append(f'{s:>9}' + ''.join(f'{_number(report["summary"][h][s]):>11}' for h in headers))
    return '\n'.join(lines)


def sweep_plot(path, reports):
    """Every metric of SWEEP_METRICS against severity, one panel each, one line per report."""
    panels = [(header, 'severity (0: clean)', header,
               [(r['label'], list(range(6)), r['summary'][header]) for r in reports])
              for _, _, header in SWEEP_METRICS]
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
        label = args.label or default_label(models, method, args.dropout) + (', calibrated' if args.calibration else '')
        if args.corruption == 'all':
            return run_sweep(args, model, method, label, num_classes, rank, world_size, device)
        return run(args, model, method, label, num_classes, rank, world_size, device)


def evaluate_split(args, model, method, label, num_classes, rank, world_size, device, corruption=None, drawing=None):
    """One evaluation of the split (corrupted if asked) -> the result dict (the JSON's content)."""
    dataset = data.build_dataset(args.data, args.root, args.split, train=False, max_depth=args.max_depth,
                                 corruption=corruption, num_images=args.synthetic_images,
                                 size=tuple(args.synthetic_size), ood=args.synthetic_ood)
    loader = plumbing.eval_loader(dataset, args.batch_size, args.workers, rank, world_size, device)
    kwargs = dict({'samples': args.samples, 'dropout': args.dropout} if method == 'mcd' else {}, decompose=True)
    torch.manual_seed(args.seed + rank)  # MC Dropout masks: repeatable, different on each rank
    metrics = uq.evaluate(model, loader, num_classes, method, device, plumbing.autocast_dtype(args.precision, device),
                          AfterBatch(len(loader.dataset), rank, drawing), **kwargs)
    seg, depth = metrics['seg'], metrics['depth']
    if seg is not None:
        seg = dict(seg, iou=dict(zip(data.CLASS_NAMES[args.data], seg['iou'])),
                   reliability=reliability_bins(metrics['seg_metrics']))
    if depth is not None:
        depth = dict(depth, sparsification_curves=metrics['depth_metrics'].sparsification_curves())
    settings = {k: v for k, v in vars(args).items() if k != 'checkpoints'}
    return plumbing.json_safe({
        'label': label, 'settings': dict(settings, device=str(device), world_size=world_size,
                                         corruption=corruption and list(corruption)),
        'checkpoints': list(args.checkpoints), 'method': method, 'seg': seg, 'depth': depth, 'ood': metrics['ood'],
        'time_ms': timing(metrics['times'], args.warmup)})


def run(args, model, method, label, num_classes, rank, world_size, device):
    """One evaluation, printed (rank 0), written to --json and drawn into --save-vis."""
    corruption = (args.corruption, args.severity) if args.corruption else None
    if rank == 0:
        print(f'{label}: {args.data} {args.split}' + (f', {corruption[0]} at severity {corruption[1]}' if corruption else '')
              + f', method {method}, {world_size} rank(s) on {device}')
    drawing = None
    if rank == 0 and args.save_vis:
        drawing = Figures(args.save_vis, args.num_vis, label, data.PALETTES[args.data],
                          data.CLASS_NAMES[args.data], num_classes)
    result = evaluate_split(args, model, method, label, num_classes, rank, world_size, device, corruption, drawing)
    if rank == 0:
        print(format_row(result))
        print(format_extras(result))
        print(format_uncertainty(result))
        if result['ood'] is not None:
            print(format_ood(result))
        if args.json:
            plumbing.write_json(result, args.json)
        if drawing is not None and result['seg'] is not None:
            figures.reliability_diagram(os.path.join(args.save_vis, 'reliability.png'), result['seg']['reliability'],
                                        result['seg']['ece'], label)
        if drawing is not None and result['depth'] is not None:
            sparsification_plot(os.path.join(args.save_vis, 'sparsification.png'), result['depth'], label)
        if drawing is not None:
            print(f'wrote {len(drawing.drawn)} figure(s) to {args.save_vis}')
    return result


if __name__ == '__main__':
    plumbing.entry_point(main)
