"""bench.py: multiply-adds against formulas written out here, and the report of a tiny run."""

import importlib.util
import json
import sys

import pytest
import torch

import bench
import heads

# MiT-B0 written out independently of mit.py: per stage (channels, heads, blocks, spatial
# reduction), and the decoder width.
B0 = dict(dims=(32, 64, 160, 256), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), srs=(8, 4, 2, 1), E=256)
B2 = dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), depths=(3, 4, 6, 3), srs=(8, 4, 2, 1), E=768)
OUTS = {'segformer': 'seg', 'depthformer': 'depth', 'segdepthformer': 'seg+depth'}


def conv_out(n, k, s):
    return (n + 2 * (k // 2) - k) // s + 1  # padding k // 2, as the patch embeddings


def analytic_macs(cfg, H, W, out_channels, textbook, B=1, matrices=False, folds=False):
    """Multiply-adds of a SegFormer-style model with one decoder per entry of out_channels.

    Per stage of C channels on an h x w map (N = h*w tokens) with reduction R (N_kv tokens):
      patch embedding  N * C * C_in * k * k          (7x7 stride 4, then 3x3 stride 2)
      per block        q N C^2, sr conv N_kv C^2 R^2, kv 2 N_kv C^2, proj N C^2,
                       attention 2 * heads * N * N_kv * d (QK^T and AV, d = C / heads),
                       fc1 and fc2 4 N C^2 each, 3x3 depthwise conv 4C * 9 * N
    Decoder (width E, N_1 tokens at 1/4) per head with K outputs:
      textbook         linear_c_i N_i C_i E, fuse conv N_1 * 4E * E, prediction N_1 E K
      folded           maps W_i L_i at each stage's own resolution N_i C_i E, but stage 2 at
                       stage 1's (upsampled first, heads.folded_sum) N_1 C_2 E, prediction N_1 E K
      folds            the fold matmuls E * E * C_i and E * E (bias), whatever the batch, on a
                       call that makes them (the first: the next keep them, heads.kept_folds)
      matrices         (a CPU: heads.upsample_by_matrices) stages 3 and 4 upsampled into the
                       G * E channels of all G heads by two matrix products: h_i W_1 w_i and
                       H_1 h_i W_1 multiply-adds per channel
    """
    per_image, stages, sizes, h, w, c_in = 0, [], [], H, W, 3
    for i, (C, heads_, depth, R) in enumerate(zip(cfg['dims'], cfg['heads'], cfg['depths'], cfg['srs'])):
        k, s = (7, 4) if i == 0 else (3, 2)
        h, w = conv_out(h, k, s), conv_out(w, k, s)
        N = h * w
        N_kv = (h // R) * (w // R)
        d = C // heads_
        block = (N * C * C + (N_kv * C * C * R * R if R > 1 else 0) + 2 * N_kv * C * C + N * C * C
                 + 2 * heads_ * N * N_kv * d + 2 * 4 * N * C * C + 4 * C * 9 * N)
        per_image += N * C * c_in * k * k + depth * block
        stages.append((N, C))
        sizes.append((h, w))
        c_in = C
    E, N_1 = cfg['E'], stages[0][0]
    per_call = 0
    for K in out_channels:
        per_image += N_1 * E * K
        if textbook:
            per_image += sum(N * C * E for N, C in stages) + N_1 * 4 * E * E
        else:
            per_image += N_1 * stages[1][1] * E + sum(N * C * E for i, (N, C) in enumerate(stages) if i != 1)
            per_call += sum(E * E * C + E * E for _, C in stages) if folds else 0
    if matrices and not textbook:
        (h1, w1), G = sizes[0], len(out_channels)
        per_image += sum(G * E * (h * w1 * w + h1 * h * w1) for h, w in sizes[2:])
    return B * per_image + per_call


def out_channels(name, K):
    return {'segformer': (K,), 'depthformer': (2,), 'segdepthformer': (K, 2)}[name]


@pytest.mark.parametrize('device', ['meta', 'cpu'])
@pytest.mark.parametrize('name', list(OUTS))
@pytest.mark.parametrize('batch', [1, 2])
def test_b0_macs_equal_the_formula(device, name, batch):
    # on the CPU, SDPA runs a kernel FlopCounterMode has no formula for: bench adds one
    H, W, K = 64, 96, 5
    with torch.device(device):
        model = heads.build_model(name, 'b0', K).eval()
    x = torch.zeros(batch, 3, H, W, device=device)
    outs = out_channels(name, K)
    assert bench.count_macs(bench.Textbook(model), x) == analytic_macs(B0, H, W, outs, True, batch)
    assert bench.count_macs(model, x) == analytic_macs(B0, H, W, outs, False, batch, matrices=device == 'cpu')


def test_b2_paper_macs_match_table_1():
    # Table 1: SegFormer-B2 72.6G, DepthFormer-B2 72.1G, SegDepthFormer-B2 120.1G at 480x640, 40 classes
    x = torch.empty(1, 3, 480, 640, device='meta')
    for name, table in [('segformer', 72.6e9), ('depthformer', 72.1e9), ('segdepthformer', 120.1e9)]:
        with torch.device('meta'):
            model = heads.build_model(name, 'b2', 40)
        macs = bench.count_macs(bench.Textbook(model), x)
        assert macs == analytic_macs(B2, 480, 640, out_channels(name, 40), True)
        assert abs(macs / table - 1) < 0.02, (name, macs / 1e9)


COLUMNS = ('name', 'params', 'macs_paper', 'macs_executed', 'latency_ms_mean', 'latency_ms_std', 'latency_ms_median',
           'fps', 'peak_bytes')
TINY = ['--backbone', 'b0', '--size', '64', '96', '--num-classes', '5', '--members', '2', '--samples', '2',
        '--warmup', '1', '--iters', '2', '--device', 'cpu']


def test_tiny_run_reports_every_row(tmp_path, capsys):
    hf = ['--hf'] if importlib.util.find_spec('transformers') else []  # an optional package
    path = tmp_path / 'bench.json'
    rows = bench.main(TINY + hf + ['--json', str(path)])
    report = json.loads(path.read_text())
    # the onnx row (--onnx) is tested in test_predict.py, beside the export it times
    expected = [k for k in bench.ROWS if (hf or k not in bench.HF_ROWS) and k not in bench.ONNX_ROWS]
    assert [r['key'] for r in report['rows']] == [r['key'] for r in rows] == expected
    out = capsys.readouterr().out
    for r in report['rows']:
        assert all(c in r for c in COLUMNS), r
        assert r['params'] > 0 and r['macs_executed'] > 0 and r['latency_ms_mean'] > 0
        assert r['fps'] == pytest.approx(1e3 / r['latency_ms_median'])
        assert r['name'] in out
    for column in ('params (M)', 'MACs paper (G)', 'MACs exec (G)', 'latency (ms)', 'FPS'):
        assert column in out
    # one column of names, however long, so that every line of the table ends where the header does
    lines = out.splitlines()
    table = [line for line in lines if line.startswith('row ')] + [
        next(line for line in lines if line.startswith(r['name'] + '  ')) for r in report['rows']]
    assert max(len(r['name']) for r in report['rows']) > 34 and len({len(line) for line in table}) == 1
    assert 'latency SegDepthFormer / SegDepthFormer, textbook decoder' in out
    assert report['settings']['backbone'] == 'b0' and report['latency_ratios']
    assert report['settings']['precision'] == 'fp32'  # auto, the default, means fp32 on a CPU

    # the counting conventions, row against row (N = T = 2)
    r = {row['key']: row for row in report['rows']}
    sdf_paper, sdf_exec = r['segdepthformer']['macs_paper'], r['segdepthformer']['macs_executed']
    enc = r['encoder']['macs_paper']
    folded = analytic_macs(B0, 64, 96, (5, 2), False)
    summary = 64 * 96 * 5  # the entropy's sum over the K classes of each pixel, run as a batched matmul
    assert r['segformer']['macs_paper'] == analytic_macs(B0, 64, 96, (5,), True)
    assert sdf_paper == analytic_macs(B0, 64, 96, (5, 2), True)
    assert sdf_exec == folded + summary
    assert r['textbook']['macs_paper'] == sdf_paper and r['textbook']['macs_executed'] == sdf_paper + summary
    assert r['emuformer']['macs_paper'] == sdf_paper and r['emuformer']['macs_executed'] == sdf_exec
    # several samples: one summary at the end; on the CPU one pass per sample
    assert r['mcd']['macs_paper'] == 2 * sdf_paper
    assert r['mcd']['macs_executed'] == 2 * folded + summary
    # the plain form of a speed-up is its own row, timed in the same rounds
    assert (r['mcd-plain']['macs_paper'], r['mcd-plain']['macs_executed']) == (r['mcd']['macs_paper'],
                                                                               r['mcd']['macs_executed'])
    assert 'latency MC Dropout (T=2) / MC Dropout (T=2), plain dropout' in out
    assert r['dse']['macs_paper'] == enc + 2 * (sdf_paper - enc)
    assert r['dse']['macs_executed'] == enc + 2 * (folded - enc) + summary
    for key in ('de', 'de-batched', 'de-looped'):  # the batched members fold on every call
        folds = analytic_macs(B0, 64, 96, (5, 2), False, folds=True) - folded if key == 'de-batched' else 0
        assert r[key]['macs_paper'] == 2 * sdf_paper and r[key]['macs_executed'] == 2 * (folded + folds) + summary
        assert r[key]['params'] == 2 * r['segdepthformer']['params']
    assert all(row['peak_bytes'] > 0 for row in report['rows'])  # a fresh process each, on Linux
    if hf:  # the same architecture as our SegFormer, written by others
        assert r['hf']['macs_paper'] == r['segformer']['macs_paper']
        assert r['hf-encoder']['macs_paper'] == enc
        assert r['hf']['params'] == r['segformer']['params']


def test_hf_rows_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # importing it now raises ImportError
    with pytest.raises(SystemExit, match='pip install transformers'):
        bench.main(TINY + ['--rows', 'hf'])


def test_train_steps(capsys):
    rows = bench.main(TINY + ['--train', '--batch-size', '2', '--precision', 'bf16'])
    assert [(r['setting'], r['textbook']) for r in rows] == [
        ('fp32 eager', False), ('fp32 eager', True), ('bf16, eager', False), ('bf16, eager', True)]
    for r in rows:
        assert r['images_per_s'] == pytest.approx(2e3 / r['step_ms_mean'])
    out = capsys.readouterr().out
    for ratio in ('folded / textbook (fp32 eager)', 'folded / textbook (bf16, eager)',
                  'folded (bf16, eager) / textbook (fp32 eager)'):
        assert f'images/s {ratio}' in out

