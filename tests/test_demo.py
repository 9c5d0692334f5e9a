"""demo.py: the plan of commands, what it skips and continues, the results section it writes,
and (slow) a tiny demo run end to end, twice."""

import json
import os
import subprocess
import sys

import pytest
import torch

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(tmp_path, *argv):
    doc = tmp_path / 'results.md'
    doc.write_text(f'{demo.BEGIN}\n{demo.END}\n')
    args = demo.get_parser().parse_args(['--runs', str(tmp_path / 'runs'), '--out', str(tmp_path / 'out'),
                                         '--doc', str(doc), *argv])
    demo.check_args(args)
    return args


def fake_run(tmp_path, name, step, epochs=24, synthetic_train=200, batch_size=8):
    """A run directory whose last.pt holds `step` of a run with these arguments (all that
    demo.state reads)."""
    folder = tmp_path / 'runs' / name
    folder.mkdir(parents=True)
    torch.save({'step': step, 'args': {'epochs': epochs, 'synthetic_train': synthetic_train,
                                       'batch_size': batch_size}}, folder / 'last.pt')
    (folder / 'best.pt').write_bytes(b'')


def option(argv, flag, count=1):
    i = argv.index(flag)
    return argv[i + 1:i + 1 + count]


def test_plan_of_a_fresh_folder(tmp_path):
    args = parse(tmp_path, '--stage', 'emuformer')
    steps = demo.plan(args)
    assert [s.label for s in steps] == ['train member 0', 'train member 1', 'train member 2', 'distil EMUFormer',
                                        'evaluate baseline', 'evaluate teacher', 'evaluate emuformer',
                                        'compare baseline, teacher, EMUFormer']
    assert [demo.state(s) for s in steps] == ['new'] * 8
    runs = tmp_path / 'runs'
    best = [str(runs / f'member{i}' / 'best.pt') for i in range(3)]
    for seed, step in enumerate(steps[:3]):
        assert step.argv[0] == 'train.py'
        assert option(step.argv, '--seed') == [str(seed)]
        assert option(step.argv, '--out') == [str(runs / f'member{seed}')]
        assert option(step.argv, '--lr') == ['6e-4'] and option(step.argv, '--epochs') == ['24']
        assert option(step.argv, '--workers') == ['0'] and '--resume' not in step.argv
    distill = steps[3].argv
    assert distill[0] == 'distill.py' and option(distill, '--teacher', 3) == best
    assert option(distill, '--student-init') == [best[0]]
    assert option(distill, '--jitter', 4) == ['0.2', '0.2', '0.2', '0.02'] and option(distill, '--epochs') == ['16']
    assert steps[4].argv[1:2] == [best[0]]
    assert steps[5].argv[1:4] == best and option(steps[5].argv, '--method') == ['de']
    assert steps[6].argv[1:2] == [str(runs / 'emuformer' / 'best.pt')]
    assert steps[7].argv[1:] == [s.made for s in steps[4:7]] and steps[7].tables
    assert not any('--synthetic-size' in s.argv for s in steps)  # the scripts' own scenes unless asked


def test_plan_of_stage_all(tmp_path):
    steps = demo.plan(parse(tmp_path, '--synthetic-scenes', '8', '--synthetic-size', '32', '48'))
    assert len(steps) == 32 and steps[:8] == demo.plan(parse(tmp_path, '--stage', 'emuformer', '--synthetic-scenes',
                                                             '8', '--synthetic-size', '32', '48'))
    runs, out = tmp_path / 'runs', tmp_path / 'out'
    kinds = [s.kind for s in steps[8:]]
    assert kinds == (['train'] * 2 + ['calibrate'] + ['evaluate'] * 5 + ['compare'] + ['ood'] * 8 + ['compare'] * 2
                     + ['sweep'] * 4 + ['compare'])
    mcd, dse = steps[8].argv, steps[9].argv
    assert option(mcd, '--dropout') == ['0.2'] and option(mcd, '--out') == [str(runs / 'mcd20')]
    assert option(dse, '--model') == ['dse'] and option(dse, '--num-members') == ['3']
    for train in (mcd, dse):  # member 0's recipe and seed
        assert option(train, '--seed') == ['0'] and option(train, '--epochs') == ['24']
        assert option(train, '--lr') == ['6e-4'] and option(train, '--backbone') == ['b0']
    calibrate = steps[10].argv
    assert calibrate[0] == 'calibrate.py' and option(calibrate, '--split') == ['calib']
    assert option(steps[11].argv, '--calibration') == option(calibrate, '--out')
    mcd_best, base = str(runs / 'mcd20' / 'best.pt'), str(runs / 'member0' / 'best.pt')
    methods = {s.label: (s.argv[1], option(s.argv, '--method') if '--method' in s.argv else None)
               for s in steps[12:16]}
    assert methods == {'evaluate mcd': (mcd_best, ['mcd']), 'evaluate mcd-decoder': (mcd_best, ['mcd-decoder']),
                       'evaluate drop-path': (base, ['drop-path']),
                       'evaluate dse': (str(runs / 'dse' / 'best.pt'), None)}  # evaluate.py: 'dse' for a DSE
    assert all(option(s.argv, '--dropout') == ['0.2'] for s in steps[12:14])
    names = ['baseline', 'calibrated', 'mcd', 'mcd-decoder', 'drop-path', 'dse', 'teacher', 'emuformer']
    clean = [str(out / f'{n}.json') for n in names]
    ood = [str(out / f'ood_{n}.json') for n in names]
    assert steps[16].argv[1:] == clean and steps[16].made == str(out / 'table_main.md')
    assert [s.made for s in steps[17:25]] == ood and all('--synthetic-ood' in s.argv for s in steps[17:25])
    assert steps[25].argv[1:] == ood
    cost = steps[26]
    assert cost.argv == ['compare.py', *clean, *ood, '--cost-plot', str(out / 'cost.png'), '--overwrite']
    assert cost.made == str(out / 'cost.png') and not cost.tables
    assert [s.label for s in steps[27:31]] == [f'sweep {n}' for n in ('baseline', 'calibrated', 'teacher', 'emuformer')]
    assert all(option(s.argv, '--corruption') == ['all'] for s in steps[27:31])
    plot = option(steps[31].argv, '--plot')[0]
    assert plot == str(out / 'sweep.png') and '--overwrite' in steps[31].argv
    for s in steps:  # every command is given the tiny scenes, each in its script's spelling
        assert s.kind == 'compare' or option(s.argv, '--synthetic-size', 2) == ['32', '48']
    assert option(steps[0].argv, '--synthetic-train') == ['8'] and option(steps[4].argv, '--synthetic-val') == ['8']


def record_commands(monkeypatch):
    """Replace the running of a command by a record of it (each 'succeeds' at once)."""
    ran = []

    def fake(argv, keep_output):
        ran.append(argv)
        return 0, '| a | table |\n'
    monkeypatch.setattr(demo, 'run_command', fake)
    return ran


def test_finished_members_are_skipped_and_a_killed_one_resumed(tmp_path, monkeypatch, capsys):
    total = 24 * (200 // 8)
    fake_run(tmp_path, 'member0', total)
    fake_run(tmp_path, 'member1', total)
    fake_run(tmp_path, 'member2', total - 7)  # killed before its last step
    args = parse(tmp_path, '--stage', 'emuformer')
    steps = demo.plan(args)
    states = [demo.state(s) for s in steps]
    assert states == ['done', 'done', 'resume'] + ['new'] * 5
    ran = record_commands(monkeypatch)
    demo.run_steps(steps, states, args.out)
    assert ran[0] == steps[2].argv + ['--resume'] and ran[1:] == [s.argv for s in steps[3:]]
    printed = capsys.readouterr().out
    assert f'[1/8] train member 0: done already ({tmp_path / "runs" / "member0"}), skipped' in printed
    assert '[3/8] train member 2 (continued with --resume)' in printed
    times = json.loads((tmp_path / 'out' / 'times.json').read_text())
    assert times['train member 2']['resumed'] and not times['distil EMUFormer']['resumed']
    assert (tmp_path / 'out' / 'table_emuformer.md').read_text() == '| a | table |\n'
    # the results exist now: a second call would skip every step after the training runs
    for s in steps[4:]:
        open(s.made, 'a').close()
    os.utime(steps[7].made, (1e10, 1e10))  # the table: written after the results it reads
    assert [demo.state(s) for s in steps[4:]] == ['done'] * 4
    os.utime(steps[5].made, (2e10, 2e10))  # a result replaced since: the table is made again
    assert demo.state(steps[7]) == 'new'


def test_the_summary_names_the_command_that_ran(tmp_path, capsys):
    # python distill.py runs stage emuformer through demo.main (tests/test_distill.py), as distill.py
    steps = demo.plan(parse(tmp_path, '--stage', 'emuformer'))
    demo.summary(steps, ['done'] * len(steps), str(tmp_path / 'out'), 61.0, 'distill.py')
    assert capsys.readouterr().out.splitlines()[-1] == 'distill.py: done in 1m01s: 0 step(s) run, 8 reused'


def test_a_run_of_other_epochs_is_refused(tmp_path):
    fake_run(tmp_path, 'member0', 10, epochs=2)
    args = parse(tmp_path, '--stage', 'emuformer')
    with pytest.raises(ValueError, match='member0 holds a run of 2 epochs, and the demo asks for 24'):
        demo.state(demo.plan(args)[0])


def test_the_demo_epochs_are_the_recipes_of_train_and_distill():
    import distill, train  # the demo only runs them: it does not import them (distill.py imports demo.py)
    assert demo.EPOCHS == {'train': train.RECIPES['synthetic']['epochs'],
                           'distill': distill.RECIPES['synthetic']['epochs']}


def test_a_failed_command_names_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, 'run_command', lambda argv, keep_output: (1, ''))
    args = parse(tmp_path, '--stage', 'emuformer')
    steps = demo.plan(args)
    with pytest.raises(ChildProcessError, match=r'\[1/8\] train member 0 failed \(exit status 1\): python train.py'):
        demo.run_steps(steps, ['new'] * 8, args.out)


def test_eta_from_the_measured_steps():
    steps = [demo.Step('train member 1', 'train', [], ''), demo.Step('train member 2', 'train', [], ''),
             demo.Step('distil EMUFormer', 'distill', [], '')]
    times = {'train member 0': {'seconds': 100, 'kind': 'train', 'resumed': False},
             'train member 2': {'seconds': 140, 'kind': 'train', 'resumed': False}}
    # member 1: the mean of its kind (120 s); member 2: its own time; the student: not timed
    assert demo.eta(steps, times) == '>= 4m20s (1 step(s) of a kind not timed yet)'
    assert demo.eta(steps[:2], times) == '4m20s'
    assert demo.eta(steps[2:], times) == 'not known before a step of its kind has run'


def write_doc(path):
    before = '# Results\n\n## The CPU demo\n\nA sentence.\n' + demo.BEGIN + '\n'
    after = demo.END + '\n\n## Next\n\nkept | as | it is\n'
    path.write_text(before + 'the old tables\n' + after)
    return before, after


def test_the_section_is_replaced_between_the_markers_and_nothing_else(tmp_path):
    doc, plots = tmp_path / 'docs' / 'results.md', [tmp_path / 'sweep.png', tmp_path / 'cost.png']
    doc.parent.mkdir()
    before, after = write_doc(doc)
    for plot in plots:
        plot.write_bytes(b'\x89PNG ' + plot.name.encode())
    demo.write_section(str(doc), 'new\ntables', [str(p) for p in plots])
    assert doc.read_text() == before + 'new\ntables\n' + after
    assert (tmp_path / 'docs' / 'sweep.png').read_bytes() == b'\x89PNG sweep.png'
    assert (tmp_path / 'docs' / 'cost.png').read_bytes() == b'\x89PNG cost.png'
    demo.write_section(str(doc), 'again', [str(p) for p in plots])
    assert doc.read_text() == before + 'again\n' + after
    doc.write_text(before + 'no end marker\n')
    with pytest.raises(ValueError, match='must hold the line'):
        demo.write_section(str(doc), 'x', [str(p) for p in plots])
    with pytest.raises(ValueError, match='must hold the line'):  # found before the demo's long work
        demo.check_args(demo.get_parser().parse_args(['--doc', str(doc)]))


def test_same_as_ignores_only_the_time_column(tmp_path):
    table = '| | seg mIoU | ms/image |\n|---|---|---|\n| A | 0.894 | 20.7 |\n'
    assert demo.without_times(table) == '| | seg mIoU |\n|---|---|\n| A | 0.894 |'
    steps = [demo.Step('compare', 'compare', [], str(tmp_path / 'a' / 'table_main.md'), tables=True)]
    for folder, text in (('a', table), ('b', table.replace('20.7', '31.0'))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'table_main.md').write_text(text)
    assert demo.same_as(steps, str(tmp_path / 'b')).startswith('Run twice on this machine, the demo wrote the same')
    (tmp_path / 'b' / 'table_main.md').write_text(table.replace('0.894', '0.895'))
    assert demo.same_as(steps, str(tmp_path / 'b')).startswith('**Not reproduced:**')


def tiny_demo(tmp_path, name, *extra):
    """A demo with one epoch on eight scenes of 32x48 -> its output."""
    argv = [sys.executable, 'demo.py', '--epochs', '1', '--synthetic-scenes', '8', '--synthetic-size', '32', '48',
            '--runs', str(tmp_path / name / 'runs'), '--out', str(tmp_path / name / 'out'),
            '--doc', str(tmp_path / 'docs' / 'results.md'), *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_a_tiny_demo_end_to_end_then_again(tmp_path):
    (tmp_path / 'docs').mkdir()
    before, after = write_doc(tmp_path / 'docs' / 'results.md')
    tiny_demo(tmp_path, 'first')
    text = (tmp_path / 'docs' / 'results.md').read_text()
    assert text.startswith(before) and text.endswith(after) and 'the old tables' not in text
    assert '| EMUFormer-B0 |' in text and '| SegDepthFormer-B0 (DE x3) | 5 |' in text
    assert 'python train.py --data synthetic' in text and 'temperature of' in text
    assert (tmp_path / 'docs' / 'sweep.png').read_bytes().startswith(b'\x89PNG')
    assert (tmp_path / 'docs' / 'cost.png').read_bytes().startswith(b'\x89PNG')
    for row in ('(MCD 20%)', '(decoder MCD 20%)', '(test-time drop-path)', '(DSE x3)'):
        assert f'| SegDepthFormer-B0 {row} |' in text
    first = tmp_path / 'first' / 'out'
    tables = {p.name: p.read_text() for p in first.glob('*.md')}
    again = tiny_demo(tmp_path, 'first')  # everything exists: nothing runs again, the tables stay
    assert 'stage all: 32 steps, 32 done already' in again and '$ python' not in again
    assert tables == {p.name: p.read_text() for p in first.glob('*.md')}
    # the same on the same machine from scratch, elsewhere: the same numbers, the timing aside
    tiny_demo(tmp_path, 'second', '--stage', 'emuformer')
    second = (tmp_path / 'second' / 'out' / 'table_emuformer.md').read_text()
    assert demo.without_times(second) == demo.without_times(tables['table_emuformer.md'])
