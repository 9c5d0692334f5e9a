"""evaluate.py: the row of Tables 2-7 from real checkpoint files, equal to what its loop
computes directly; the loop itself against metrics.py at any batch size; the Figure-5-like pictures and the reliability diagram; clear errors for bad inputs;
the same numbers from two ranks as from one."""

import json
import math
import re
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

import data
import evaluate
import heads
import corrupt
import figures
import metrics
import plumbing
import uq
from heads import build_model, load_model

K = data.NUM_CLASSES['synthetic']
SIZE = (48, 64)
# 6 tiny scenes, one image per batch, the first batch left out of the timing
SYNTHETIC = ['--data', 'synthetic', '--synthetic-val', '6', '--synthetic-size', *map(str, SIZE),
             '--workers', '0', '--warmup', '1']


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # one thread: fast on a busy 2-core machine, and the same kernels as the 2-rank test's processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(path, name, seed, meta=None, num_classes=K, **kwargs):
    """A random B0 model in train.py's checkpoint format, with `meta` as data.checkpoint_meta writes it
    (class names and palette) or without. Its output layers get larger weights than the
    initialisation's N(0, 0.01), so that predictions vary from pixel to pixel."""
    torch.manual_seed(seed)
    model = build_model(name, 'b0', num_classes, **kwargs)
    for module_name, module in model.named_modules():
        if module_name.endswith('linear_pred'):
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.constant_(module.bias, 1.0)  # depth head: mostly positive means
    ckpt = {'model': model.state_dict(), 'config': model.config, 'step': 0}
    torch.save(ckpt if meta is None else dict(ckpt, meta=meta), path)
    return str(path)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('checkpoints')
    return {'segdepthformer': write_checkpoint(d / 'sdf.pt', 'segdepthformer', 0),
            'segformer': write_checkpoint(d / 'seg.pt', 'segformer', 1),
            'depthformer': write_checkpoint(d / 'depth.pt', 'depthformer', 2),
            'dse': write_checkpoint(d / 'dse.pt', 'dse', 3, num_members=3),
            'de': [write_checkpoint(d / f'member{i}.pt', 'segdepthformer', 10 + i) for i in range(3)]}


def direct(paths, method, **kwargs):
    """evaluate.evaluate on the same scenes, without evaluate.main."""
    models = [load_model(p) for p in paths]
    model = uq.DeepEnsemble(models) if method == 'de' else models[0]
    dataset = data.build_dataset('synthetic', None, 'val', train=False, num_images=6, size=SIZE)
    torch.manual_seed(0)  # evaluate.py's --seed 0 on rank 0: the same MC Dropout masks
    return evaluate.evaluate(model, DataLoader(dataset, 1, generator=torch.Generator()), K, method, **kwargs)


def strict_json(path):
    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


SEG_COLUMNS = ('miou', 'ece', 'p_accurate_certain', 'p_uncertain_inaccurate', 'pavpu')
DEPTH_COLUMNS = ('rmse', 'p_accurate_certain', 'p_uncertain_inaccurate', 'pavpu',
                 'abs_rel', 'delta1', 'delta2', 'delta3')

CASES = {  # case: (checkpoints key, extra arguments, method, row name)
    'baseline': ('segdepthformer', [], 'none', 'SegDepthFormer-B0'),
    'mcd': ('segdepthformer', ['--method', 'mcd', '--samples', '3', '--dropout', '0.2'], 'mcd',
            'SegDepthFormer-B0 (MCD 20%)'),
    'dse': ('dse', [], 'dse', 'SegDepthFormer-B0 (DSE x3)'),
    'de': ('de', [], 'de', 'SegDepthFormer-B0 (DE x3)'),
    'segformer': ('segformer', [], 'none', 'SegFormer-B0'),
    'depthformer': ('depthformer', [], 'none', 'DepthFormer-B0'),
}


@pytest.mark.parametrize('case', CASES)
def test_row_and_json_equal_uq(case, ckpt, tmp_path, capsys):
    key, extra, method, name = CASES[case]
    paths = ckpt[key] if isinstance(ckpt[key], list) else [ckpt[key]]
    result = evaluate.main([*paths, *SYNTHETIC, *extra, '--json', str(tmp_path / 'r.json')])
    out = capsys.readouterr().out

    # the JSON is valid (no NaN) and is what main returned
    assert strict_json(tmp_path / 'r.json') == result
    assert result['method'] == method and result['name'] == name and result['checkpoints'] == paths
    assert set(result['time_ms']) >= {'mean', 'std', 'n'} and result['time_ms']['n'] == 5  # 6 - 1 warm-up
    assert result['time_ms']['mean'] > 0

    # the numbers are uq's own, column by column; a missing task is null
    kwargs = {'samples': 3, 'dropout': 0.2} if method == 'mcd' else {}
    expected = plumbing.json_safe(direct(paths, method, **kwargs))
    has_seg, has_depth = key != 'depthformer', key != 'segformer'
    assert (result['seg'] is None) == (not has_seg) and (result['depth'] is None) == (not has_depth)
    if has_seg:
        for k in (*SEG_COLUMNS, 'pixel_acc'):
            assert result['seg'][k] == expected['seg'][k], k
        assert list(result['seg']['iou'].values()) == expected['seg']['iou']
        assert list(result['seg']['iou']) == list(data.SYNTHETIC_CLASSES)
    if has_depth:
        for k in DEPTH_COLUMNS:
            assert result['depth'][k] == expected['depth'][k], k

    # the printed table: the paper's headers and one row, '-' for a missing task
    lines = out.splitlines()
    header = next(line for line in lines if 'mIoU' in line)
    for column in ('ECE', 'p(acc/cer)', 'p(unc/inacc)', 'PAvPU', 'RMSE', 'Inference Time [ms]'):
        assert column in header
    row = lines[lines.index(header) + 1].split()
    assert ' '.join(row).startswith(name)
    cells = row[len(name.split()):]  # 9 columns, then 'mean +- std'
    assert len(cells) == 9 + 3 and cells[-2] == '+-'
    assert (cells[:5] == ['-'] * 5) == (not has_seg) and (cells[5:9] == ['-'] * 4) == (not has_depth)
    if has_seg:
        assert cells[0] == f"{result['seg']['miou']:.3f}"
    if has_depth:
        assert cells[5] == f"{result['depth']['rmse']:.3f}" and 'AbsRel' in out

    # the second block: the uncertainty metrics beyond the paper's, and the decomposition,
    # which a single network has with no epistemic part
    for task, block in (('seg', 'segmentation uncertainty'), ('depth', 'depth uncertainty')):
        assert (block in out) == (result[task] is not None)
        if result[task] is not None:
            for key, _ in evaluate.UNCERTAINTY_COLUMNS[task]:
                assert result[task][key] is not None, key
    if has_seg and method == 'none':
        assert result['seg']['mutual_information_mean'] == pytest.approx(0, abs=1e-6)
    if has_seg and method != 'none':
        assert result['seg']['mutual_information_mean'] > 1e-4
    if has_depth and method == 'none':
        assert result['depth']['epistemic_var_mean'] == 0


def test_evaluate_streams_the_same_numbers_at_any_batch_size():
    torch.manual_seed(0)
    dataset = data.build_dataset('synthetic', None, 'val', train=False, num_images=8, size=(48, 64))
    model = build_model('segdepthformer', 'b0', data.NUM_CLASSES['synthetic'])
    results = [evaluate.evaluate(model, DataLoader(dataset, batch_size=b), 6) for b in (1, 3, 8)]
    assert [len(r['times']) for r in results] == [8, 3, 1]  # one predict() per batch: 8 images in batches of 1, 3, 8
    everything = torch.utils.data.default_collate([dataset[i] for i in range(8)])
    pred = uq.predict(model, everything['image'])
    seg, dep = metrics.SegMetrics(6), metrics.DepthMetrics()
    seg.update(pred.probs, everything['label'], pred.entropy)
    dep.update(pred.depth_mean, pred.depth_var, everything['depth'])
    for r in results:
        assert all(t > 0 for t in r['times'])
        want = seg.compute()
        for key, value in want.items():
            # batches of other sizes round the entropies differently: a pixel can change bin,
            # which moves a histogram metric within its bound and the bound a little
            if key.endswith('_bound'):
                assert r['seg'][key] == pytest.approx(value, rel=0.05), key
            elif f'{key}_bound' in want:
                assert abs(r['seg'][key] - value) <= 2 * want[f'{key}_bound'] + 1e-9, key
            else:
                assert r['seg'][key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
        for key, value in dep.compute().items():
            # sparsification orders pixels by their variance, which rounds differently too
            rel = 1e-4 if key.startswith(('ause', 'aurg')) else 1e-6
            assert r['depth'][key] == pytest.approx(value, rel=rel, nan_ok=True), key
    assert evaluate.evaluate(build_model('depthformer', 'b0', 6), DataLoader(dataset, batch_size=4), 6)['seg'] is None


def test_nothing_counted_is_said_out_loud():
    seg = metrics.SegMetrics(2)
    seg.update(torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2), 255), torch.ones(1, 2, 2))
    depth = metrics.DepthMetrics()
    depth.update(torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    notes = evaluate.nothing_counted({'seg': seg.compute(), 'depth': depth.compute()})
    assert len(notes) == 2 and 'no labelled pixel' in notes[0] and 'no valid ground-truth depth' in notes[1]
    assert evaluate.nothing_counted({'seg': None, 'depth': None}) == []


def test_reliability_bins_in_json(ckpt):
    result = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC])
    bins, seg = result['seg']['reliability'], result['seg']
    assert len(bins['count']) == 15 and len(bins['edges']) == 16
    dataset = data.build_dataset('synthetic', None, 'val', train=False, num_images=6, size=SIZE)
    labelled = sum((dataset[i]['label'] != data.IGNORE_INDEX).sum().item() for i in range(6))
    assert sum(bins['count']) == labelled
    # ECE from the bins: sum_m n_m / n |acc_m - conf_m|
    ece = sum(n * abs(a - c) for n, a, c in zip(bins['count'], bins['accuracy'], bins['confidence']) if n)
    assert ece / labelled == pytest.approx(seg['ece'], rel=1e-9)
    for n, a, c in zip(bins['count'], bins['accuracy'], bins['confidence']):
        assert (a is None) == (n == 0) and (c is None) == (n == 0)


def test_json_safe_turns_nan_into_null():
    x = plumbing.json_safe({'a': math.nan, 'b': [np.float64('nan'), 1.5, np.float64(2), math.inf], 'c': None, 'd': 3})
    assert x == {'a': None, 'b': [None, 1.5, 2.0, None], 'c': None, 'd': 3}
    json.dumps(x, allow_nan=False)


def test_save_vis_writes_figure5_panels(ckpt, tmp_path, capsys):
    out = tmp_path / 'vis'
    evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--save-vis', str(out), '--num-vis', '4'])
    dataset = data.build_dataset('synthetic', None, 'val', train=False, num_images=6, size=SIZE)
    names = [dataset[i]['name'] for i in range(4)]
    stem = evaluate.file_stem(evaluate.default_name(heads.load_members([ckpt['segdepthformer']]), 'none', 0.2))
    written = sorted([f'{stem}_{n}.png' for n in names] + [f'{stem}_reliability.png', f'{stem}_sparsification.png'])
    assert sorted(p.name for p in out.iterdir()) == written  # the files name the model and the image
    assert f'wrote 6 figure(s) to {out}: ' in capsys.readouterr().out  # the count is what was written

    # the panels of scene 3 (it has unlabelled pixels and depth holes), from a direct prediction
    batch = next(iter(DataLoader(torch.utils.data.Subset(dataset, [3]), 1)))
    pred = uq.predict(load_model(ckpt['segdepthformer']), batch['image'], decompose=True)
    palette = data.PALETTES['synthetic']
    rows = figures.prediction_panels(batch['image'], pred, 0, palette, K, batch['label'], batch['depth'])
    assert [len(r) for r in rows] == [7, 7] and rows[1][0] is None
    for row in rows:
        for panel in row:
            assert panel is None or panel.pixels.shape == (*SIZE, 3) and panel.pixels.dtype == np.uint8
    image, truth, seg, error, entropy, aleatoric, mutual = (p.pixels for p in rows[0])
    colours = {tuple(c) for c in palette}
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= colours
    assert len({tuple(c) for c in seg.reshape(-1, 3)}) > 1  # the random model predicts several classes
    ignore = batch['label'][0].numpy() == data.IGNORE_INDEX
    assert ignore.any() and (truth[ignore] == 0).all() and (error[ignore] == 0).all()
    assert {tuple(c) for c in truth[~ignore]} <= colours
    wrong = (pred.pred[0].numpy() != batch['label'][0].numpy()) & ~ignore
    assert (error[wrong] == figures.WRONG).all() and (error[~wrong & ~ignore] == 255).all()
    assert image.std() > 10 and entropy.std() > 1  # not blank
    depth_truth = rows[1][1].pixels
    invalid = batch['depth'][0].numpy() <= 0
    assert invalid.any() and (depth_truth[invalid] == 0).all() and (depth_truth[~invalid].sum(-1) > 0).all()
    # every continuous map has a colour bar with its range and unit; categorical ones have none,
    # and neither has the mutual information of one network, zero everywhere: a blank panel says so
    assert [p.bar is not None for p in rows[0]] == [False, False, False, False, True, True, False]
    assert [p.bar[3] for p in rows[1][1:6]] == ['m'] * 5 and rows[0][4].bar[1:] == (0, np.log(K), 'nats')
    assert rows[1][6].bar is None and rows[1][6].note == figures.ZERO_NOTE  # the depth's epistemic part too
    assert np.array_equal(aleatoric, entropy)  # one network: no epistemic part, all its entropy is aleatoric
    assert (mutual == figures.BLANK).all() and rows[0][6].note == figures.ZERO_NOTE

    # the PNG: two rows of five enlarged panels, each where figure_layout says
    figure = np.array(Image.open(out / f'{stem}_{names[3]}.png').convert('RGB'))
    s, cell_w, cell_h, origin = figures.figure_layout(rows)
    assert figure.shape[1] == figures.PAD + 7 * cell_w
    assert figure.shape[0] > figures.PAD + figures.TITLE_HEIGHT + 2 * cell_h  # + the legend
    for r, c, pixels in ((0, 2, seg), (0, 0, image), (1, 1, depth_truth)):
        x, y = origin(r, c)
        shown = figure[y:y + SIZE[0] * s, x:x + SIZE[1] * s]
        assert np.array_equal(shown[::s, ::s], pixels)
    x, y = origin(1, 4)  # the depth std's colour bar runs from inferno's dark end to its bright end
    bar = figure[y + SIZE[0] * s + 5, x:x + SIZE[1] * s].astype(int)
    assert bar[2].sum() < 100 and bar[-3].sum() > 600

    reliability = Image.open(out / f'{stem}_reliability.png')
    assert reliability.size == (640, 536) and np.array(reliability.convert('L')).std() > 10
    assert np.array(Image.open(out / f'{stem}_sparsification.png').convert('L')).std() > 10


def test_save_vis_depth_only_has_one_row_and_no_reliability(ckpt, tmp_path):
    out = tmp_path / 'vis'
    evaluate.main([ckpt['depthformer'], *SYNTHETIC, '--save-vis', str(out), '--num-vis', '1'])
    files = [f for f in out.iterdir() if not f.name.endswith('_sparsification.png')]
    assert len(files) == 1
    s = figures.panel_scale(SIZE[1])
    cell_w = SIZE[1] * s + figures.PAD
    cell_h = figures.TITLE_HEIGHT + SIZE[0] * s + figures.BAR_HEIGHT + figures.PAD
    legend = figures.LEGEND_LINE + figures.PAD  # one line: what black means
    assert Image.open(files[0]).size == (figures.PAD + 7 * cell_w,
                                         figures.PAD + figures.TITLE_HEIGHT + cell_h + legend)


def test_outputs_are_checked_before_the_work_and_never_replaced_silently(ckpt, tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **kw: evaluated.append(1))
    blocked = tmp_path / 'file'
    blocked.write_text('a file where a folder should be')
    with pytest.raises(OSError, match=f'--json {blocked / "r.json"}: cannot write'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--json', str(blocked / 'r.json')])
    with pytest.raises(OSError, match='--save-vis .*cannot write'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--save-vis', str(blocked / 'vis')])
    (tmp_path / 'r.json').write_text('{"an": "earlier result"}')
    with pytest.raises(FileExistsError, match='--json .*r.json already holds a result; pass --overwrite'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--json', str(tmp_path / 'r.json')])
    (tmp_path / 'vis').mkdir()
    (tmp_path / 'vis' / 'x.png').write_bytes(b'')
    with pytest.raises(FileExistsError, match='--save-vis .*vis already holds a result'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--save-vis', str(tmp_path / 'vis')])
    assert not evaluated and (tmp_path / 'r.json').read_text() == '{"an": "earlier result"}'
    monkeypatch.undo()
    result = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--json', str(tmp_path / 'r.json'), '--overwrite'])
    assert strict_json(tmp_path / 'r.json') == result


def test_warmup_longer_than_the_data_still_times(ckpt, capsys):
    result = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--warmup', '10'])
    assert result['time_ms']['n'] == 1 and result['time_ms']['warmup'] == 5 and result['time_ms']['mean'] > 0
    assert '--warmup 10 asked, but a rank had only 6 batches' in capsys.readouterr().out


def test_the_student_of_distill_is_named_emuformer(ckpt, tmp_path):
    state = torch.load(ckpt['segdepthformer'], weights_only=True)
    torch.save({**state, 'meta': data.checkpoint_meta('synthetic', objective='eq11')}, tmp_path / 'student.pt')
    assert evaluate.main([str(tmp_path / 'student.pt'), *SYNTHETIC])['name'] == 'EMUFormer-B0'


def test_bad_inputs_are_named(ckpt, tmp_path):
    missing = str(tmp_path / 'nope.pt')
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        evaluate.main([missing, *SYNTHETIC])
    with pytest.raises(ValueError, match='one architecture.*segformer-b0'):
        evaluate.main([ckpt['segdepthformer'], ckpt['segformer'], *SYNTHETIC])
    with pytest.raises(ValueError, match='--method dse needs a Deep Sub-Ensemble'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--method', 'dse'])
    with pytest.raises(ValueError, match='is a Deep Sub-Ensemble.*--method dse'):
        evaluate.main([ckpt['dse'], *SYNTHETIC, '--method', 'mcd'])
    with pytest.raises(ValueError, match='form a Deep Ensemble'):
        evaluate.main([*ckpt['de'], *SYNTHETIC, '--method', 'none'])
    with pytest.raises(ValueError, match='one checkpoint per member'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--method', 'de'])
    with pytest.raises(ValueError, match='Deep Sub-Ensemble; the members'):
        evaluate.main([ckpt['dse'], ckpt['dse'], *SYNTHETIC])
    with pytest.raises(ValueError, match='needs --root'):
        evaluate.main([ckpt['segdepthformer'], '--data', 'nyuv2'])
    with pytest.raises(ValueError, match='6 classes, nyuv2 has 40'):
        evaluate.main([ckpt['segdepthformer'], '--data', 'nyuv2', '--root', str(tmp_path)])


def _rank(rank, port, argv):
    # what torchrun sets up for each process
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    evaluate.main(argv)


def same_floats(a, b, rel):
    """Two lists of floats equal within rel, with None (an empty bin) in the same places."""
    return ([x is None for x in a] == [y is None for y in b]
            and all(x == pytest.approx(y, rel=rel) for x, y in zip(a, b) if x is not None))


def test_two_ranks_give_the_single_process_numbers(ckpt, tmp_path):
    argv = [*ckpt['de'], *SYNTHETIC]
    single = evaluate.main([*argv, '--json', str(tmp_path / 'single.json')])
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, [*argv, '--json', str(tmp_path / 'ranks.json')]), nprocs=2)
    ranks = strict_json(tmp_path / 'ranks.json')
    assert ranks['settings']['world_size'] == 2 and ranks['time_ms']['n'] == 4  # 3 - 1 per rank
    for task in ('seg', 'depth'):
        for k, v in single[task].items():
            if k == 'reliability':
                assert ranks[task][k]['count'] == v['count']
                assert ranks[task][k]['accuracy'] == v['accuracy']
                assert same_floats(ranks[task][k]['confidence'], v['confidence'], rel=1e-12)
            elif k == 'sparsification_curves':
                for metric, curves in v.items():
                    for name, values in curves.items():
                        assert ranks[task][k][metric][name] == pytest.approx(values, rel=1e-12, abs=1e-15)
            elif isinstance(v, float):  # float64 sums added in another order
                assert ranks[task][k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
            else:
                assert ranks[task][k] == v, k


# ---------------------------------------------------------------------------------------------
# under shift: unseen objects, corrupted images, the sweep

def test_synthetic_ood_adds_the_ood_block(ckpt, capsys):
    single = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--synthetic-ood'])
    assert set(single['ood']) == {'entropy', 'mutual_information', 'depth_var'}
    assert single['ood']['mutual_information'] is None  # a single network has no epistemic part
    for score in ('entropy', 'depth_var'):
        v = single['ood'][score]
        assert 0 <= v['auroc'] <= 1 and 0 < v['ood_pixels'] < v['pixels'] == 6 * SIZE[0] * SIZE[1]
    assert 'out-of-distribution pixels' in capsys.readouterr().out
    ensemble = evaluate.main([*ckpt['de'], *SYNTHETIC, '--synthetic-ood'])
    assert ensemble['ood']['mutual_information']['auroc'] is not None
    # the in-distribution metrics leave the objects out: labels ignored, depths invalid
    plain = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC])
    assert single['seg']['pixels'] < plain['seg']['pixels'] and single['depth']['pixels'] < plain['depth']['pixels']
    assert plain['ood'] is None


def test_a_corrupted_evaluation(ckpt):
    clean = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC])
    noisy = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--corruption', 'gaussian_noise', '--severity', '5'])
    assert noisy['settings']['corruption'] == ['gaussian_noise', 5]
    assert noisy['seg']['pixels'] == clean['seg']['pixels'] and noisy['seg']['entropy_mean'] != clean['seg']['entropy_mean']
    with pytest.raises(ValueError, match='--corruption fog needs --severity'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--corruption', 'fog'])
    with pytest.raises(ValueError, match='--corruption all needs --json'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--corruption', 'all'])


def test_a_killed_sweep_goes_on_where_it_stopped(ckpt, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, 'evaluate.py', ckpt['segdepthformer'], *SYNTHETIC, '--synthetic-val', '2',
            '--corruption', 'all']
    killed = subprocess.Popen([*argv, '--json', str(tmp_path / 'a.json')], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = tmp_path / 'a.cells'
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.glob('*.json')) if cells.exists() else []) < 5:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = {p.name: p.stat().st_mtime_ns for p in cells.glob('*.json')}
    assert 5 <= len(done) < 51 and not (tmp_path / 'a.json').exists()
    resumed = subprocess.run([*argv, '--json', str(tmp_path / 'a.json')], cwd=root, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert all((cells / name).stat().st_mtime_ns == t for name, t in done.items())  # not redone
    assert resumed.stdout.count('cell ') == 51 - len(done)
    straight = subprocess.run([*argv, '--json', str(tmp_path / 'b.json')], cwd=root, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = strict_json(tmp_path / 'a.json'), strict_json(tmp_path / 'b.json')
    assert a['summary'] == b['summary'] and len(a['cells']) == 51
    assert a['summary']['mIoU'][0] == a['cells']['clean_0']['seg']['miou']
    assert (tmp_path / 'a.png').exists()
    # every cell is deterministic: the mean over corruptions at severity 5 is that of the cells
    mean = sum(a['cells'][f'{c}_5']['seg']['miou'] for c in corrupt.CORRUPTIONS) / 10
    assert a['summary']['mIoU'][5] == pytest.approx(mean, rel=1e-12)


def test_compare_puts_the_json_numbers_side_by_side(ckpt, tmp_path, capsys):
    import compare
    evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--synthetic-ood', '--json', str(tmp_path / 'single.json')])
    evaluate.main([*ckpt['de'], *SYNTHETIC, '--synthetic-ood', '--json', str(tmp_path / 'de.json')])
    single, de = strict_json(tmp_path / 'single.json'), strict_json(tmp_path / 'de.json')
    paper, seg, depth, operating, ood = compare.main([str(tmp_path / 'single.json'), str(tmp_path / 'de.json')])
    rows = {line.split(' | ')[0].strip('| '): line for line in paper.splitlines()[2:]}
    assert set(rows) == {single['name'], de['name']}
    assert f"| {de['seg']['miou']:.3f} |" in rows[de['name']]
    assert f"| {single['depth']['rmse']:.3f} |" in rows[single['name']]
    assert operating.splitlines()[2] == (f"| {single['name']} | {single['seg']['risk_at_80']:.3f} | "
                                         f"{single['seg']['coverage_at_5']:.3f} | {single['seg']['rss']:.3f} | - | - |")
    ood_rows = ood.splitlines()[2:]
    assert len(ood_rows) == 2 and ' - | - | - |' in ood_rows[0]  # the single network has no mutual information
    assert f"{de['ood']['mutual_information']['auroc']:.3f}" in ood_rows[1]
    with pytest.raises(ValueError, match='cannot read .*missing.json'):
        compare.main([str(tmp_path / 'missing.json')])


# ---------------------------------------------------------------------------------------------
# the sweep's cells carry their settings; numbers out of range are refused where parsed

@pytest.fixture
def one_corruption(monkeypatch):
    """A sweep of 6 cells (clean, then fog at severities 1..5) instead of 51, to keep it short."""
    monkeypatch.setattr(corrupt, 'CORRUPTIONS', ('fog',))


def test_a_sweep_refuses_cells_of_other_settings(ckpt, tmp_path, one_corruption, capsys):
    sweep = [ckpt['segdepthformer'], *SYNTHETIC, '--synthetic-val', '2', '--corruption', 'all']
    first = evaluate.main([*sweep, '--json', str(tmp_path / 'a.json')])
    out = capsys.readouterr().out
    assert out.count('cell ') == 6 and len(first['cells']) == 6
    assert 'eta' in out.splitlines()[1] and '6/6 evaluated' in out and 'sweep done: 6 evaluated' in out
    cells = tmp_path / 'a.cells'
    for path in cells.glob('*.json'):
        assert strict_json(path)['determined_by'] == first['determined_by']
    (tmp_path / 'a.json').unlink()  # as if killed before the summary
    (cells / 'fog_5.json').unlink()
    calibration = tmp_path / 'c.json'
    calibration.write_text(json.dumps({'temperature': 1.5, 'variance_scale': 2.0, 'num_classes': K}))
    for extra, differing in ((['--split', 'calib'], 'split val (now calib)'),
                             (['--synthetic-val', '3'], 'synthetic_scenes 2 (now 3)'),
                             (['--synthetic-size', '64', '64'], 'synthetic_size [48, 64] (now [64, 64])'),
                             (['--max-depth', '5'], 'max_depth 10.0 (now 5.0)'),
                             (['--precision', 'bf16'], 'precision fp32 (now bf16)'),
                             (['--calibration', str(calibration)], 'calibration None (now '),
                             (['--synthetic-ood'], 'synthetic_ood False (now True)'),
                             (['--method', 'mcd'], 'method none (now mcd)')):
        with pytest.raises(ValueError, match='holds cells of a sweep with other settings: .*' + re.escape(differing)):
            evaluate.main([*sweep, *extra, '--json', str(tmp_path / 'a.json')])
    other = tmp_path / 'other.pt'
    other.write_bytes(open(ckpt['de'][0], 'rb').read())  # the same architecture, other weights
    with pytest.raises(ValueError, match=r'checkpoints \[.*\] \(now \[.*\], by SHA-256\)'):
        evaluate.main([str(other), *sweep[1:], '--json', str(tmp_path / 'a.json')])
    assert not (cells / 'fog_5.json').exists()  # nothing was evaluated by a refused sweep

    # the same checkpoint elsewhere is the same checkpoint: the sweep goes on with the last cell
    moved = tmp_path / 'moved.pt'
    moved.write_bytes(open(ckpt['segdepthformer'], 'rb').read())
    capsys.readouterr()
    again = evaluate.main([str(moved), *sweep[1:], '--json', str(tmp_path / 'a.json')])
    assert capsys.readouterr().out.count('cell ') == 1 and again['summary'] == first['summary']


def test_overwrite_starts_a_sweep_over(ckpt, tmp_path, one_corruption, capsys):
    sweep = [ckpt['segdepthformer'], *SYNTHETIC, '--synthetic-val', '2', '--corruption', 'all',
             '--json', str(tmp_path / 'a.json')]
    evaluate.main(sweep)
    with pytest.raises(FileExistsError, match='already holds a result; pass --overwrite'):
        evaluate.main(sweep)
    cells = tmp_path / 'a.cells'
    (cells / 'stale.json').write_text('{}')  # whatever else is there goes too
    capsys.readouterr()
    result = evaluate.main([*sweep, '--overwrite', '--max-depth', '5'])
    out = capsys.readouterr().out
    assert out.count('cell ') == 6  # every cell evaluated again, none reused
    assert 'interval' not in out  # no --calibration: no interval in the cells' lines or the table
    assert sorted(p.name for p in cells.iterdir()) == sorted(f'{c}_{s}.json' for c, s in evaluate.sweep_cells())
    assert all(strict_json(p)['determined_by']['max_depth'] == 5.0 for p in cells.iterdir())
    assert result['determined_by']['max_depth'] == 5.0


def test_a_cell_without_settings_is_refused(ckpt, tmp_path, one_corruption):
    (tmp_path / 'a.cells').mkdir()
    (tmp_path / 'a.cells' / 'clean_0.json').write_text(json.dumps({'checkpoints': [ckpt['segdepthformer']],
                                                                   'method': 'none'}))
    with pytest.raises(ValueError, match='clean_0.json records no settings .*--overwrite'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--corruption', 'all', '--json', str(tmp_path / 'a.json')])


@pytest.mark.parametrize('option, value, message', [  # the options every script shares: test_plumbing.py
    ('--batch-size', '-4', 'argument --batch-size: -4 is not an integer >= 1'),
    ('--warmup', 'x', 'argument --warmup: x is not an integer >= 0'),
    ('--max-depth', '0', 'argument --max-depth: 0 is not a number > 0'),
])
def test_numbers_out_of_range_are_refused_where_parsed(ckpt, option, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, option, value])
    assert exit.value.code == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])


def test_severity_needs_a_corruption(ckpt):
    with pytest.raises(ValueError, match='--severity 3 needs --corruption NAME'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--severity', '3'])
    with pytest.raises(ValueError, match='--severity 3 needs --corruption NAME'):
        evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--severity', '3', '--corruption', 'all',
                       '--json', 'unused.json'])


def test_name_names_the_row(ckpt, capsys):
    result = evaluate.main([ckpt['segdepthformer'], *SYNTHETIC, '--name', 'my model'])
    assert result['name'] == 'my model' and 'label' not in result
    assert any(line.startswith('my model') for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize('method, name, options', [
    ('mcd-decoder', 'SegDepthFormer-B0 (decoder MCD 20%)', {'samples': 3, 'dropout': 0.2}),
    ('drop-path', 'SegDepthFormer-B0 (test-time drop-path)', {'samples': 3})])
def test_the_cheap_baselines_are_rows_with_their_own_settings(ckpt, method, name, options):
    argv = [ckpt['segdepthformer'], *SYNTHETIC, '--method', method, '--samples', '3']
    result = evaluate.main(argv)
    assert result['name'] == name and result['method'] == method
    # what determines a sweep's cells: the method's own options, and no other's
    determined = evaluate.sweep_settings(evaluate.get_parser().parse_args(argv), method, torch.device('cpu'), 1)
    assert {k: determined[k] for k in ('samples', 'dropout') if k in determined} == options
    assert result['seg']['mutual_information_mean'] >= 0 and result['depth']['epistemic_var_mean'] >= 0


def test_a_metric_no_sweep_measured_gets_no_panel_or_column(monkeypatch, tmp_path):
    import compare
    drawn = {}
    monkeypatch.setattr(figures, 'line_plots', lambda path, panels, title: drawn.update(
        titles=[title for title, *_ in panels]))
    plain = {'name': 'a', 'summary': {h: [None if h.startswith('interval') else 0.1] * 6
                                      for *_, h in evaluate.SWEEP_METRICS}}
    calibrated = {'name': 'b', 'summary': {h: [0.2] * 6 for *_, h in evaluate.SWEEP_METRICS}}
    evaluate.sweep_plot(tmp_path / 'sweep.png', [plain])
    assert drawn['titles'] == [h for *_, h in evaluate.SWEEP_METRICS if not h.startswith('interval')]
    assert 'interval' not in evaluate.format_sweep(plain) and 'nan' not in evaluate.format_sweep(plain)
    evaluate.sweep_plot(tmp_path / 'sweep.png', [plain, calibrated])  # one sweep has it: its panel is back
    assert drawn['titles'] == [h for *_, h in evaluate.SWEEP_METRICS]
    table = compare.sweep_table([plain, calibrated])
    assert table.splitlines()[2].endswith('| interval coverage | interval width |')
    assert table.splitlines()[4].endswith('| - | - |') and table.splitlines()[-1].endswith('| 0.200 | 0.200 |')


def test_the_sweep_plot_names_its_units(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(figures, 'line_plots', lambda path, panels, title: drawn.update(panels=panels))
    summary = {header: [0.1] * 6 for _, _, header in evaluate.SWEEP_METRICS}
    evaluate.sweep_plot(tmp_path / 'sweep.png', [{'name': 'a', 'summary': summary}])
    y_labels = {title: y for title, _, y, _ in drawn['panels']}
    assert y_labels['RMSE'] == 'RMSE (m)' and y_labels['depth var'] == 'depth var (m^2)'
    assert y_labels['depth NLL'] == 'depth NLL (nats)' and y_labels['mIoU'] == 'mIoU'  # a ratio has none
