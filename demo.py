"""
The CPU demo of the whole method on the synthetic scenes, in one command: every step is one of
the project's commands, run as a user would type it, in its own process, its output shown as it
comes. This file only plans the commands, runs them, and writes down what they made.

    stage emuformer (what `python distill.py` with no arguments runs)
        the Deep Ensemble: three B0 SegDepthFormers, seeds 0, 1, 2          train.py
        EMUFormer: the student of the three, initialised from member 0      distill.py --teacher
        the baseline (member 0), the teacher (the three) and the student    evaluate.py
        their comparison table                                              compare.py
    stage all (python demo.py), after the above
        an MC Dropout model (member 0's recipe with dropout at 20%) and a
        Deep Sub-Ensemble of three heads per task                           train.py
        the calibration baseline: member 0 with a temperature, a variance
        scale and a split-conformal depth interval from the calib split     calibrate.py
        the methods of Tables 2-5 (MC Dropout at 20% only; three members
        and heads, not ten) and the two cheap baselines: the baseline,
        calibrated, MC Dropout, its decoder-only variant, test-time
        drop-path (on the baseline), the DSE, the DE and EMUFormer, on the
        validation scenes, then on unseen objects (--synthetic-ood), each
        followed by its table                                               evaluate.py, compare.py
        the figure of their cost against their uncertainty quality          compare.py --cost-plot
        the corruption sweep (--corruption all) of the baseline, the
        calibrated baseline, the DE and EMUFormer, its table and plot       evaluate.py, compare.py
        then the demo section of the results document, between its markers: the tables, the two
        figures, the commit, the date, the machine, and each command with its time

Where: the run directories under --runs (runs/demo/: member0, member1, member2, emuformer, and
with stage all mcd20, dse), every result under --out (out/demo/), both ignored by git; --doc's
section and its two figures beside it (sweep.png, cost.png).

Run again, it continues where it stopped: a training run whose last.pt holds its last step is
skipped, one whose last.pt holds an earlier step goes on with --resume (train.py continues it
exactly), a result file that exists is reused (the scripts write each file whole or not at
all; a sweep that was killed goes on from its finished cells). Each command prints its own
progress; this file prints one line per step with the time so far and an ETA from the measured
times of the steps (OUT/times.json keeps them across calls), and a summary at the end.
The seeds are fixed and every data loader runs in the main process (--workers 0), so that a
second demo on the same machine writes the same numbers, evaluate.py's timing aside; --same-as
checks it against another demo's tables. How long each step took: docs/results.md.

    python demo.py                                    # everything
    python demo.py --stage emuformer                  # = python distill.py
    python demo.py --runs runs/demo2 --out out/demo2 --same-as out/demo   # again, and compare
    python demo.py --epochs 1 --synthetic-size 32 48 --synthetic-scenes 8 --runs /tmp/r --out /tmp/o \\
        --doc /tmp/results.md                         # a tiny run that shows every step works
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import plumbing

STAGES = ('emuformer', 'all')
SEEDS = (0, 1, 2)  # the Deep Ensemble's members
MCD_RATE = 0.2  # the MC Dropout model's rate, in training and sampling (the paper's 20%)
DSE_HEADS = 3  # the Deep Sub-Ensemble's heads per task: as many as the Deep Ensemble's members
SAMPLES = 10  # of MC Dropout and the two cheap baselines (the paper's T)
EMUFORMER_STAGE = ('baseline', 'teacher', 'emuformer')  # the models stage emuformer evaluates
SWEPT = ('baseline', 'calibrated', 'teacher', 'emuformer')  # the models of the corruption sweep
FIGURES = ('sweep.png', 'cost.png')  # stage all's, in OUT and beside --doc
# the synthetic recipe of train.py and distill.py, spelled out so that every command shown says it
RECIPE = ['--data', 'synthetic', '--lr', '6e-4']
EPOCHS = {'train': 24, 'distill': 16}  # the members', the student's (tests/test_demo.py: the scripts' recipes)
JITTER = ['--jitter', '0.2', '0.2', '0.2', '0.02']  # the teacher's colour jitter on these scenes
BEGIN = '<!-- demo.py writes this section: begin -->'
END = '<!-- demo.py writes this section: end -->'


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--stage', choices=STAGES, default='all', help='emuformer: what `python distill.py` runs; '
                                                                  'all: everything, then --doc')
    p.add_argument('--runs', default='runs/demo', help='the run directories of the trained models')
    p.add_argument('--out', default='out/demo', help='the results: JSON files, tables, the two figures, times')
    p.add_argument('--doc', default='docs/results.md', help='stage all: the results document whose demo '
                                                            'section (between its markers) is replaced')
    p.add_argument('--same-as', metavar='OUT', help="stage all: another demo's --out, whose tables this "
                                                    "demo's must equal (the time columns aside)")
    p.add_argument('--epochs', type=plumbing.positive_int,
                   help=f"of every training run (default: the recipes', {EPOCHS['train']} for the members and "
                        f"{EPOCHS['distill']} for the student)")
    p.add_argument('--synthetic-scenes', type=plumbing.positive_int, metavar='N',
                   help='training, validation and calibration scenes each (default: the scripts\' own)')
    p.add_argument('--synthetic-size', type=plumbing.positive_int, nargs=2, metavar=('H', 'W'),
                   help="scene size (default: the scripts' own)")
    return p


def check_args(args):
    if args.same_as and not os.path.isdir(args.same_as):
        raise FileNotFoundError(f'--same-as {args.same_as}: no such folder (another demo\'s --out)')
    if args.same_as and args.stage != 'all':
        raise ValueError('--same-as compares the tables of stage all; leave it out or use --stage all')
    if args.stage == 'all' and not os.path.isfile(args.doc):
        raise FileNotFoundError(f'--doc {args.doc}: no such file (the results document whose demo section '
                                f'stage all writes)')
    if args.stage == 'all':  # before the long work, not after it
        with open(args.doc) as f:
            check_markers(f.read(), args.doc)


# ---------------------------------------------------------------------------------------------
# the plan: every step a command


@dataclass
class Step:
    """One command of the demo. `made` is what it writes: a run directory (train.py, distill.py)
    or a file; compare.py's tables, which it prints, are saved in `made` (tables=True)."""
    label: str    # 'train member 0'
    kind: str     # train, distill, evaluate, ood, sweep, calibrate, compare: one kind, about one time
    argv: list    # what follows `python`: ['train.py', '--data', ...]
    made: str
    tables: bool = False


def scene_options(args, *count_flags):
    """The options that set the synthetic scenes, where demo.py was given them: each of the
    script's `count_flags` (its spelling of a number of scenes) and --synthetic-size."""
    options = []
    if args.synthetic_scenes is not None:
        for flag in count_flags:
            options += [flag, str(args.synthetic_scenes)]
    if args.synthetic_size:
        options += ['--synthetic-size', *map(str, args.synthetic_size)]
    return options


def paths(args):
    """Where each model's checkpoint, calibration and results are."""
    members = [os.path.join(args.runs, f'member{seed}') for seed in SEEDS]
    return {'members': members, 'best': [os.path.join(m, 'best.pt') for m in members],
            'student': os.path.join(args.runs, 'emuformer'),
            'mcd': os.path.join(args.runs, 'mcd20'), 'dse': os.path.join(args.runs, 'dse'),
            'calibration': os.path.join(args.out, 'calibration.json')}


def train_argv(args, seed, out):
    """train.py with member `seed`'s recipe, into `out` (options of the model follow)."""
    return ['train.py', *RECIPE, '--workers', '0', '--device', 'cpu',
            *scene_options(args, '--synthetic-train', '--synthetic-val'),
            '--epochs', str(args.epochs or EPOCHS['train']), '--backbone', 'b0', '--seed', str(seed), '--out', out]


def training_steps(args):
    """The three members (train.py) and the student (distill.py)."""
    p = paths(args)
    steps = [Step(f'train member {seed}', 'train', train_argv(args, seed, member), member)
             for seed, member in zip(SEEDS, p['members'])]
    steps.append(Step('distil EMUFormer', 'distill',
                      ['distill.py', '--teacher', *p['best'], '--student-init', p['best'][0], *RECIPE,
                       '--workers', '0', '--device', 'cpu', *scene_options(args, '--synthetic-train', '--synthetic-val'),
                       '--epochs', str(args.epochs or EPOCHS['distill']), *JITTER, '--out', p['student']],
                      p['student']))
    return steps


def other_training_steps(args):
    """Stage all: the MC Dropout model and the Deep Sub-Ensemble, each member 0's recipe and
    seed but for its dropout rate, or its heads."""
    p = paths(args)
    return [Step('train MC Dropout model', 'train', train_argv(args, SEEDS[0], p['mcd']) + ['--dropout', str(MCD_RATE)],
                 p['mcd']),
            Step('train Deep Sub-Ensemble', 'train',
                 train_argv(args, SEEDS[0], p['dse']) + ['--model', 'dse', '--num-members', str(DSE_HEADS)], p['dse'])]


def models(args):
    """name -> evaluate.py's positional arguments and method options for it, in the tables' order."""
    p = paths(args)
    mcd = os.path.join(p['mcd'], 'best.pt')
    return {'baseline': [p['best'][0]],
            'calibrated': [p['best'][0], '--calibration', p['calibration']],
            'mcd': [mcd, '--method', 'mcd', '--dropout', str(MCD_RATE), '--samples', str(SAMPLES)],
            'mcd-decoder': [mcd, '--method', 'mcd-decoder', '--dropout', str(MCD_RATE), '--samples', str(SAMPLES)],
            'drop-path': [p['best'][0], '--method', 'drop-path', '--samples', str(SAMPLES)],
            'dse': [os.path.join(p['dse'], 'best.pt')],
            'teacher': [*p['best'], '--method', 'de'],
            'emuformer': [os.path.join(p['student'], 'best.pt')]}


def evaluation_steps(args, names, kind):
    """evaluate.py of each model in `names`: kind 'evaluate' (the validation scenes), 'ood'
    (--synthetic-ood) or 'sweep' (--corruption all), into OUT/<prefix><name>.json."""
    extra, prefix = {'evaluate': ([], ''), 'ood': (['--synthetic-ood'], 'ood_'),
                     'sweep': (['--corruption', 'all'], 'sweep_')}[kind]
    common = ['--data', 'synthetic', '--workers', '0', '--device', 'cpu', *scene_options(args, '--synthetic-val')]
    jsons = {name: result_path(args, prefix, name) for name in names}
    return [Step(f'{kind} {name}', kind, ['evaluate.py', *what, *common, *extra, '--json', jsons[name]], jsons[name])
            for name, what in models(args).items() if name in names]


def result_path(args, prefix, name):
    return os.path.join(args.out, f'{prefix}{name}.json')


def compare_step(args, label, jsons, table, plot=None):
    """compare.py of `jsons`, its tables saved in OUT/<table>.md; with a plot (replaced if one
    was left by a compare.py killed before its tables were saved)."""
    argv = ['compare.py', *jsons] + (['--plot', plot, '--overwrite'] if plot else [])
    return Step(label, 'compare', argv, os.path.join(args.out, f'{table}.md'), tables=True)


def plan(args):
    """Every step of args.stage, in order."""
    steps = training_steps(args) + evaluation_steps(args, EMUFORMER_STAGE, 'evaluate')
    steps.append(compare_step(args, 'compare baseline, teacher, EMUFormer', [s.made for s in steps[-3:]],
                              'table_emuformer'))
    if args.stage == 'emuformer':
        return steps
    p, every = paths(args), tuple(models(args))
    steps += other_training_steps(args)
    steps.append(Step('calibrate baseline', 'calibrate',
                      ['calibrate.py', p['best'][0], '--data', 'synthetic', '--split', 'calib', '--workers', '0',
                       '--device', 'cpu', *scene_options(args, '--synthetic-calib'), '--out', p['calibration']],
                      p['calibration']))
    steps += evaluation_steps(args, [n for n in every if n not in EMUFORMER_STAGE], 'evaluate')
    clean = [result_path(args, '', n) for n in every]
    steps.append(compare_step(args, 'compare every method', clean, 'table_main'))
    steps += evaluation_steps(args, every, 'ood')
    ood = [result_path(args, 'ood_', n) for n in every]
    steps.append(compare_step(args, 'compare unseen objects', ood, 'table_ood'))
    sweep, cost = (os.path.join(args.out, name) for name in FIGURES)
    steps.append(Step('plot cost against quality', 'compare',
                      ['compare.py', *clean, *ood, '--cost-plot', cost, '--overwrite'], cost))
    steps += evaluation_steps(args, SWEPT, 'sweep')
    steps.append(compare_step(args, 'compare the sweeps', [result_path(args, 'sweep_', n) for n in SWEPT],
                              'table_sweep', plot=sweep))
    return steps


# ---------------------------------------------------------------------------------------------
# what is done already


def state(step):
    """'done' (skip it), 'resume' (a training run whose last.pt holds an earlier step than its
    last) or 'new'. A result file is whole once it exists (the scripts write atomically); a
    compare step's tables or figure are done only if no result they read is newer."""
    if step.kind == 'compare':  # done if made after every result it reads (else of results since replaced)
        inputs = [a for a in step.argv if a.endswith('.json')]
        done = os.path.exists(step.made) and all(os.path.getmtime(a) <= os.path.getmtime(step.made) for a in inputs
                                                 if os.path.exists(a))
        return 'done' if done else 'new'
    if step.kind not in ('train', 'distill'):
        return 'done' if os.path.exists(step.made) else 'new'
    epochs = int(step.argv[step.argv.index('--epochs') + 1])
    last = os.path.join(step.made, 'last.pt')
    if not os.path.exists(last):
        return 'new'
    checkpoint = plumbing.load_file(last)
    run = checkpoint['args']
    if run['epochs'] != epochs:
        raise ValueError(f'{step.made} holds a run of {run["epochs"]} epochs, and the demo asks for {epochs}: '
                         f'give the demo another --runs, or delete {step.made}')
    steps_per_epoch = run['synthetic_train'] // run['batch_size']  # train.py's, on the synthetic scenes
    return 'done' if checkpoint['step'] >= run['epochs'] * steps_per_epoch else 'resume'


def estimate(step, times):
    """The seconds `step` should take: its own measured time (an earlier call's), else the mean
    of the measured steps of its kind, else None."""
    if step.label in times:
        return times[step.label]['seconds']
    same = [t['seconds'] for t in times.values() if t['kind'] == step.kind]
    return sum(same) / len(same) if same else None


def eta(pending, times):
    """The time the `pending` steps should take, as text."""
    known = [estimate(step, times) for step in pending]
    untimed = sum(t is None for t in known)
    total = plumbing.format_duration(sum(t for t in known if t is not None))
    if untimed == len(pending):
        return 'not known before a step of its kind has run'
    return total if not untimed else f'>= {total} ({untimed} step(s) of a kind not timed yet)'


def read_times(path):
    """OUT/times.json: label -> {'seconds', 'kind', 'resumed'} of each step run so far."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f'{path} is not the times demo.py writes ({e}); delete it to time the steps anew') from None


# ---------------------------------------------------------------------------------------------
# running the steps


def run_command(argv, keep_output):
    """`python argv...` in its own process, its output shown as it comes -> (exit status, its
    standard output if keep_output). Ctrl-C reaches the command too (it is passed on, in case it
    did not come from the terminal), and the command is let finish its own way out first."""
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE if keep_output else None, text=True)
    lines = []
    try:
        if keep_output:
            for line in child.stdout:
                print(line, end='', flush=True)
                lines.append(line)
        return child.wait(), ''.join(lines)
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)  # a second one is ignored by the scripts (plumbing.interrupt_once)
        child.wait()
        raise


def run_steps(steps, states, out):
    """Run the steps that are not done, in order, with a progress line before each; record each
    one's time in OUT/times.json. -> the seconds this call took."""
    times_path = os.path.join(out, 'times.json')
    times, start = read_times(times_path), time.perf_counter()
    for i, (step, status) in enumerate(zip(steps, states)):
        where = f'[{i + 1}/{len(steps)}] {step.label}'
        if status == 'done':
            print(f'{where}: done already ({step.made}), skipped', flush=True)
            if step.tables:  # the tables are what the step is for: shown again
                with open(step.made) as f:
                    print(f.read(), end='', flush=True)
            continue
        argv = step.argv + (['--resume'] if status == 'resume' else [])
        pending = [s for s, st in zip(steps[i:], states[i:]) if st != 'done']
        print(f'{where}{" (continued with --resume)" if status == "resume" else ""} | '
              f'{plumbing.format_duration(time.perf_counter() - start)} so far | eta {eta(pending, times)}\n'
              f'$ python {shlex.join(argv)}', flush=True)
        began = time.perf_counter()
        try:
            code, output = run_command(argv, step.tables)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f'interrupted at {where}; run the same command again to continue') from None
        if code != 0:
            raise ChildProcessError(f'{where} failed (exit status {code}): python {shlex.join(argv)}')
        if step.tables:
            os.makedirs(os.path.dirname(step.made), exist_ok=True)
            plumbing.save_atomic(step.made, lambda f: f.write(output.encode()))
        seconds = time.perf_counter() - began
        times[step.label] = {'seconds': seconds, 'kind': step.kind, 'resumed': status == 'resume'}
        os.makedirs(out, exist_ok=True)
        plumbing.write_json(times, times_path)
    return time.perf_counter() - start


def summary(steps, states, out, seconds, script):
    """What each step made and where, which were run now and which reused, and the time."""
    times = read_times(os.path.join(out, 'times.json'))
    for step, status in zip(steps, states):
        took = plumbing.format_duration(times[step.label]['seconds']) if step.label in times else '?'
        print(f'  {step.label:<40} {"reused" if status == "done" else "made":<6} {took:>7}  {step.made}')
    ran = sum(status != 'done' for status in states)
    print(f'{script}: done in {plumbing.format_duration(seconds)}: {ran} step(s) run, {len(steps) - ran} reused',
          flush=True)


# ---------------------------------------------------------------------------------------------
# the results document


def git(*argv):
    """A git command's output in this file's folder, or None outside a git checkout."""
    try:
        done = subprocess.run(['git', *argv], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine():
    """The CPU model, the cores, the load at this moment, the torch version and its threads."""
    model = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        model = names[0] if names else model
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
    return (f'{model}, {os.cpu_count()} cores (load average {load} over 1, 5, 15 min when the section was '
            f'written); torch {torch.__version__}, {torch.get_num_threads()} threads')


def tables_of(path):
    """compare.py's tables, saved by the demo, without the lines naming the files it wrote."""
    with open(path) as f:
        return ''.join(line for line in f if not line.startswith('wrote ')).strip()


def calibration_line(path):
    with open(path) as f:
        c = json.load(f)
    return (f"calibrate.py fitted a temperature of {c['temperature']:.3g} (seg NLL {c['seg_nll_before']:.4f} -> "
            f"{c['seg_nll_after']:.4f}), a depth variance scale of {c['variance_scale']:.3g} (depth NLL "
            f"{c['depth_nll_before']:.4f} -> {c['depth_nll_after']:.4f}) and the split-conformal depth interval "
            f"mu +- {c['interval_scale']:.3g} sigma for {c['interval_coverage_target']:.0%} coverage on the "
            f"{c['images']} scenes of the calib split, which no model trained on.")


TIME_COLUMN = 'ms/image'  # compare.py's column of evaluate.py's timing, which no rerun repeats exactly


def without_times(text):
    """Markdown tables with their TIME_COLUMN left out (other lines as they are)."""
    lines, drop = [], None
    for line in text.splitlines():
        if not line.startswith('|'):
            lines.append(line)
            drop = None
            continue
        cells = line.strip('|').split('|')
        if drop is None:  # a table's header row
            drop = [i for i, cell in enumerate(cells) if cell.strip() == TIME_COLUMN]
        lines.append('|' + '|'.join(cell for i, cell in enumerate(cells) if i not in drop) + '|')
    return '\n'.join(lines)


def same_as(steps, other):
    """The closing note's check: are the tables of this demo those of another's --out `other`,
    the time column aside? -> a sentence."""
    names = [os.path.basename(step.made) for step in steps if step.tables]
    missing = [n for n in names if not os.path.exists(os.path.join(other, n))]
    if missing:
        raise FileNotFoundError(f'--same-as {other}: it lacks {", ".join(missing)} (not a finished demo\'s --out)')
    differ = [n for step, n in zip([s for s in steps if s.tables], names)
              if without_times(tables_of(step.made)) != without_times(tables_of(os.path.join(other, n)))]
    if differ:
        return f'**Not reproduced:** its tables differ from those of `{other}` in {", ".join(differ)}.'
    return (f'Run twice on this machine, the demo wrote the same numbers: every table above equals, cell for cell, '
            f'that of another demo in `{other}` (`--same-as`), the time column ({TIME_COLUMN}) aside.')


def section(steps, times, note):
    """The demo section of the results document, from the files this demo wrote."""
    out = os.path.dirname(steps[-1].made)
    commit, dirty = git('rev-parse', '--short', 'HEAD'), git('status', '--porcelain', '--untracked-files=no')
    version = 'outside a git checkout' if commit is None else f'commit {commit}' + (
        ', with uncommitted changes' if dirty else '')
    total = plumbing.format_duration(sum(times[s.label]['seconds'] for s in steps if s.label in times))
    resumed = any(times.get(s.label, {}).get('resumed') for s in steps)
    commands = []
    for i, step in enumerate(steps):
        took = plumbing.format_duration(times[step.label]['seconds']) if step.label in times else 'not timed'
        took += ', its last part (continued with --resume)' if times.get(step.label, {}).get('resumed') else ''
        commands += [f'# [{i + 1}/{len(steps)}] {step.label}: {took}', f'python {shlex.join(step.argv)}']
    return '\n'.join([
        f'Made by `python demo.py` on {datetime.date.today().isoformat()} ({version}): every number and the plots '
        f'in this section are its output, written here by it; the tables are those compare.py printed. Machine: '
        f'{machine()}. Its steps took {total} in all{" (as measured; some ran in parts)" if resumed else ""}.',
        '', f'The methods of Tables 2-5 and the two cheap baselines on the validation scenes, B0 SegDepthFormers '
            f'all: the baseline (member 0), calibrated (calibrate.py), MC Dropout (a model trained with dropout at '
            f'{MCD_RATE:.0%}, {SAMPLES} samples at that rate), its decoder-only variant (the encoder run once), '
            f'test-time drop-path (the baseline with its stochastic depth on, {SAMPLES} samples), the Deep '
            f'Sub-Ensemble ({DSE_HEADS} heads per task), the Deep Ensemble of the {len(SEEDS)} members (the '
            f'teacher), and EMUFormer ({TIME_COLUMN}: evaluate.py\'s time per image here):',
        '', tables_of(os.path.join(out, 'table_main.md')),
        '', calibration_line(os.path.join(out, 'calibration.json')),
        '', '**Unseen objects** (`--synthetic-ood`: in every scene, objects of a shape, colour and texture of no '
            'training class; how well each uncertainty tells their pixels from the others of the same images):',
        '', tables_of(os.path.join(out, 'table_ood.md')),
        '', '**Cost against uncertainty quality**, from the results above (compare.py --cost-plot): each method\'s '
            'time per image over the baseline\'s in the same kind of run, on a log scale. The paper\'s claim is '
            'that EMUFormer sits at the cost of one network with the quality of the ensemble:',
        '', f'![cost against uncertainty quality: one point per method and panel]({FIGURES[1]})',
        '', '**Corrupted images** (`--corruption all`: the clean scenes and ten ImageNet-C corruptions at five '
            'severities, 51 evaluations per model):',
        '', tables_of(os.path.join(out, 'table_sweep.md')),
        '', f'![the corruption sweep: each metric against severity, one line per model]({FIGURES[0]})',
        '', 'The commands, in order, each with the time it took (`python demo.py` ran them):',
        '', '```bash', *commands, '```', '', note])


def check_markers(text, doc):
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f'--doc {doc} must hold the line {BEGIN} once, and after it {END} once: '
                         f'the demo writes its section between them')


def write_section(doc, text, figures):
    """Replace what stands between the markers BEGIN and END in `doc` by `text`, and put the
    `figures` (PNG paths) beside it under their own names; nothing else in the document changes."""
    with open(doc) as f:
        old = f.read()
    check_markers(old, doc)
    new = old[:old.index(BEGIN) + len(BEGIN)] + '\n' + text + '\n' + old[old.index(END):]
    for path in figures:
        with open(path, 'rb') as f:
            picture = f.read()
        plumbing.save_atomic(os.path.join(os.path.dirname(doc), os.path.basename(path)), lambda f: f.write(picture))
    plumbing.save_atomic(doc, lambda f: f.write(new.encode()))


# ---------------------------------------------------------------------------------------------


def main(argv=None, script='demo.py'):
    """The demo's steps; `script` names the command in its messages (distill.py runs stage
    emuformer through here)."""
    args = get_parser().parse_args(argv)
    check_args(args)
    steps = plan(args)
    states = [state(step) for step in steps]
    print(f'{script}, stage {args.stage}: {len(steps)} steps, {states.count("done")} done already; '
          f'models in {args.runs}, results in {args.out}', flush=True)
    seconds = run_steps(steps, states, args.out)
    if args.stage == 'all':
        times = read_times(os.path.join(args.out, 'times.json'))
        note = same_as(steps, args.same_as) if args.same_as else (
            'Reproducibility: not checked in this run; a second demo into other folders, given this one\'s '
            f'with --same-as (`python demo.py --runs runs/demo2 --out out/demo2 --same-as {args.out}`), checks '
            'that it writes the same numbers and says so here.')
        write_section(args.doc, section(steps, times, note), [os.path.join(args.out, name) for name in FIGURES])
        print(f'wrote the demo section of {args.doc}, and beside it {" and ".join(FIGURES)}')
    summary(steps, states, args.out, seconds, script)


if __name__ == '__main__':
    plumbing.entry_point(main)
