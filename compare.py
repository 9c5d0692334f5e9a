"""
Side by side: evaluate.py's JSON results of several models or methods as markdown tables (and a
plot for corruption sweeps), for a README or a paper. Each file is read for what it holds:

    an evaluation        the paper's columns (Tables 2-7), then the uncertainty metrics of
                         evaluate.py's second block: scoring rules, failure detection, selective
                         prediction, sparsification, calibration of the variance, decomposition;
                         then selective prediction's operating points, RSS and the conformal
                         depth interval (evaluate.OPERATING_COLUMNS)
    with an 'ood' block  out-of-distribution detection per score (--synthetic-ood, or any data
                         set whose samples carry an ood mask)
    a sweep              (--corruption all) each metric on the clean images (severity 0) and
                         its mean over the corruptions at each severity 1..5; with --plot one
                         figure with a line per sweep, whose path is printed
    anything else        refused, naming the file (a calibration, predict.py's predict.json)

A row is named as its result is (evaluate.py --name). Beside clean results, a result with an
'ood' block is named 'NAME, OOD data'; two evaluations that would share a row name are refused.

--cost-plot draws the paper's claim in one figure: each evaluation's cost, its time per image
over that of the single network (the uncalibrated result of method none) among the results of
its kind, on a log scale, against its uncertainty quality: seg ECE, seg failure AUROC, depth
AUSE RMSE and depth NLL from the results without an 'ood' block, OOD AUROC by entropy and by
depth variance from those with one. A point per result and panel, one marker per model.

    python compare.py out/baseline.json out/calibrated.json out/teacher.json out/emuformer.json
    python compare.py out/sweep_*.json --plot out/sweep.png
    python compare.py out/*.json --cost-plot out/cost.png   # clean and --synthetic-ood results
"""

import argparse
import json

import corrupt
import evaluate
import figures
import plumbing

# --cost-plot's panels: (title, y label, block of the result, key or (score, key) in its 'ood' block)
COST_PANELS = [('seg ECE', 'ECE', 'seg', 'ece'),
               ('seg failure AUROC', 'AUROC', 'seg', 'auroc_failure'),
               ('depth AUSE RMSE', 'AUSE rmse (m)', 'depth', 'ause_rmse'),
               ('depth NLL', 'depth NLL (nats)', 'depth', 'nll'),
               ('OOD AUROC by entropy', 'AUROC', 'ood', ('entropy', 'auroc')),
               ('OOD AUROC by depth variance', 'AUROC', 'ood', ('depth_var', 'auroc'))]


def _cell(value, digits=3):
    return '-' if value is None else f'{value:.{digits}f}'


def markdown(headers, rows):
    """A markdown table: headers, then rows of cells (already strings)."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def row_names(results):
    """Each evaluation's row name: its name, and where the results mix clean data with data that
    holds OOD objects (an 'ood' block), ', OOD data' after the latter's, so that one model's two
    rows tell which is which."""
    mixed = len({bool(r.get('ood')) for r in results}) > 1
    return [f"{r['name']}, OOD data" if mixed and r.get('ood') else r['name'] for r in results]


def evaluation_tables(results, names):
    """The paper's columns, the second block's, and the operating points' (evaluate.OPERATING_COLUMNS),
    one row per result, named `names` (row_names)."""
    paper = markdown(['', *[f'{t} {h}' for t, _, h in evaluate.COLUMNS], 'ms/image'],
                     [[name, *[_cell((r[t] or {}).get(k)) for t, k, _ in evaluate.COLUMNS],
                       _cell(r['time_ms']['mean'], 1)] for name, r in zip(names, results)])
    tables = [paper]
    for task in ('seg', 'depth'):
        columns = evaluate.UNCERTAINTY_COLUMNS[task]
        tables.append(markdown(['', *[f'{task} {h}' for _, h in columns]],
                               [[name, *[_cell((r[task] or {}).get(k)) for k, _ in columns]]
                                for name, r in zip(names, results)]))
    tables.append(markdown(['', *[h for *_, h in evaluate.OPERATING_COLUMNS]],
                           [[name, *[_cell((r[t] or {}).get(k)) for t, k, _ in evaluate.OPERATING_COLUMNS]]
                            for name, r in zip(names, results)]))
    return tables


def check_names(paths, names):
    """Refuse evaluations (from `paths`) whose row names (row_names) are the same: their rows
    could not be told apart."""
    for name in names:
        same = [path for path, n in zip(paths, names) if n == name]
        if len(same) > 1:
            raise ValueError(f"{', '.join(same)} share the row name {name!r}: give each its own "
                             "(evaluate.py --name), or compare them apart")


def ood_table(results, names):
    """AUROC / AUPR / FPR95 of each score, one row per result, named `names` (row_names)."""
    scores = ('entropy', 'mutual_information', 'depth_var')
    headers = ['', *[f'{s} {m}' for s in scores for m in ('AUROC', 'AUPR', 'FPR95')]]
    return markdown(headers, [[name, *[_cell((r['ood'][s] or {}).get(m)) for s in scores
                                        for m in ('auroc', 'aupr', 'fpr95')]] for name, r in zip(names, results)])


def sweep_table(reports):
    """A caption, then each metric at severity 0 (the clean images) and at severities 1..5 (the
    mean over the corruptions), one row per sweep and severity, a column per metric that some
    sweep measured (evaluate.measured); '-' where a sweep lacks it."""
    headers = evaluate.measured(reports)
    caption = (f'Corruption sweeps: severity 0 is the clean images, 1..5 the mean over the '
               f'{len(corrupt.CORRUPTIONS)} corruptions at that severity')
    return caption + '\n\n' + markdown(['', 'severity', *headers],
                                        [[r['name'], str(s), *[_cell(r['summary'].get(h, [None] * 6)[s])
                                                               for h in headers]]
                                         for r in reports for s in range(6)])


def single_network(results, ood):
    """The result that --cost-plot measures the cost of the results of one kind against (with an
    'ood' block if `ood`, else without): the uncalibrated result of method none, the first where
    there are several; None where there is none."""
    return next((s for s in results if bool(s.get('ood')) == ood and s['method'] == 'none'
                 and not s['settings'].get('calibration')), None)


def costs(results):
    """Each result's time per image over that of the single network of its kind."""
    out = []
    for r in results:
        single = single_network(results, bool(r.get('ood')))
        if single is None:
            raise ValueError(f"--cost-plot measures cost against one network: give the result of method none, "
                             f"uncalibrated, {'with' if r.get('ood') else 'without'} --synthetic-ood, beside {r['name']}")
        out.append(time_per_image(r) / time_per_image(single))
    return out


def time_per_image(result):
    """evaluate.py's mean time per predict() call over its batch size, in ms."""
    return result['time_ms']['mean'] / result['settings']['batch_size']


def cost_plot(path, results):
    """--cost-plot: COST_PANELS, a point per result (module docstring)."""
    x = costs(results)
    panels = []
    for title, ylabel, block, key in COST_PANELS:
        series = []
        for r, cost in zip(results, x):
            if bool(r.get('ood')) != (block == 'ood') or not r.get(block):
                continue
            value = (r['ood'][key[0]] or {}).get(key[1]) if block == 'ood' else r[block].get(key)
            series.append((r['name'], [cost], [value]))
        single = single_network(results, block == 'ood')  # None only where the panel has no point
        panels.append((title, f"time per image / {single['name']}'s" if single else 'time per image', ylabel, series))
    figures.line_plots(path, panels, 'cost and uncertainty quality of each method', columns=3, log_x=True)


def read_result(path):
    """The JSON at `path`, and which kind of evaluate.py result it is: 'sweep' (--corruption all)
    or 'evaluation'. Any other file is refused, naming it and, where it is one, what it is."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path} ({e})') from None
    if isinstance(result, dict) and {'name', 'summary', 'cells'} <= result.keys():
        return result, 'sweep'
    if isinstance(result, dict) and {'name', 'seg', 'depth', 'time_ms'} <= result.keys():
        return result, 'evaluation'
    what = ('a calibration written by calibrate.py' if isinstance(result, dict) and 'variance_scale' in result else
            "predict.py's record of its outputs" if isinstance(result, dict) and 'skipped' in result else
            'a JSON file of another kind')
    raise ValueError(f"{path} is {what}, not an evaluate.py result (its --json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help="evaluate.py's --json files")
    p.add_argument('--plot', help='for sweeps: one plot, a line per sweep, written here (PNG)')
    p.add_argument('--cost-plot', metavar='PNG', help='for evaluations: cost against uncertainty quality, '
                                                         'a point per result (module docstring), written here')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --plot or --cost-plot')
    args = p.parse_args(argv)
    loaded = [read_result(path) for path in args.results]
    sweeps = [r for r, kind in loaded if kind == 'sweep']
    evaluations = [r for r, kind in loaded if kind == 'evaluation']
    names = row_names(evaluations)
    check_names([path for path, (_, kind) in zip(args.results, loaded) if kind == 'evaluation'], names)
    if args.plot and not sweeps:
        raise ValueError('--plot draws corruption sweeps (evaluate.py --corruption all), and none of the files is one')
    if args.cost_plot and not evaluations:
        raise ValueError('--cost-plot draws evaluations (evaluate.py --json without --corruption all), and none of '
                         'the files is one')
    for option, path in (('--plot', args.plot), ('--cost-plot', args.cost_plot)):
        if path:
            plumbing.check_output(path, option, args.overwrite)
    if args.cost_plot:
        costs(evaluations)  # refused before anything is written when the single network is missing
    tables = evaluation_tables(evaluations, names) if evaluations else []
    ood = [k for k, r in enumerate(evaluations) if r.get('ood')]
    if ood:
        tables.append(ood_table([evaluations[k] for k in ood], [names[k] for k in ood]))
    if sweeps:
        tables.append(sweep_table(sweeps))
    print('\n\n'.join(tables))
    if args.plot:
        evaluate.sweep_plot(args.plot, sweeps)
        print(f'wrote {args.plot}')
    if args.cost_plot:
        cost_plot(args.cost_plot, evaluations)
        print(f'wrote {args.cost_plot}')
    return tables


if __name__ == '__main__':
    plumbing.entry_point(main)
