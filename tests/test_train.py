"""train.py: the schedule, exact resume after a kill, torchrun on CPU, and (slow) a real run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import losses
import train
from heads import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--data', 'synthetic', '--backbone', 'b0', '--synthetic-train', '16', '--synthetic-val', '4',
        '--synthetic-size', '64', '64', '--batch-size', '4', '--lr', '6e-4', '--workers', '0',
        '--log-every', '1', '--eval-every', '0']


def run_script(args, env=None, **kw):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_polynomial_schedule_is_eq_12():
    assert train.lr_at(0, 100, 6e-5, 0.9) == 6e-5
    assert train.lr_at(50, 100, 6e-5, 0.9) == pytest.approx(6e-5 * 0.5 ** 0.9)
    assert train.lr_at(99, 100, 6e-5, 0.9) == pytest.approx(6e-5 * 0.01 ** 0.9)


def test_parameter_groups():
    model = build_model('segdepthformer', 'b0', 5)
    groups = train.param_groups(model, 1e-3, 0.01, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g['params']) for g in groups) == len(names)
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            assert g['lr_mult'] == (1.0 if n.startswith('backbone.') else 10.0), n
            assert g['weight_decay'] == (0.01 if p.ndim > 1 else 0.0), n  # not on norms and biases


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    common = ['train.py', *TINY, '--epochs', '3', '--save-every', '1']
    straight = run_script([*common, '--out', str(tmp_path / 'a')])
    assert straight.wait(300) == 0, straight.stdout.read()

    killed = run_script([*common, '--out', str(tmp_path / 'b')])
    last = tmp_path / 'b' / 'last.pt'
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once a checkpoint past the first epoch exists
        if last.exists() and torch.load(last, weights_only=True)['step'] >= 5:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = torch.load(last, weights_only=True)['step']
    assert 5 <= stopped_at < 12, 'the run was not killed mid-run'

    resumed = run_script([*common, '--out', str(tmp_path / 'b'), '--resume'])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f'resumed from {last} at step {stopped_at}' in output
    a = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a['step'] == b['step'] == 12
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])


def test_torchrun_two_ranks_follows_the_single_process_loss_curve(tmp_path):
    # The same global batch of 8 (4 per rank). No dropout or stochastic depth, so the only
    # differences left are BatchNorm's statistics, over 4 images per rank instead of 8
    # (SyncBatchNorm needs a GPU), and each rank averaging its loss over its own pixels.
    common = [*TINY, '--synthetic-train', '32', '--batch-size', '8', '--epochs', '2',
              '--dropout', '0', '--drop-path', '0']
    single = run_script(['train.py', *common, '--out', str(tmp_path / 'one')])
    assert single.wait(300) == 0, single.stdout.read()
    ddp = run_script(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                      *common, '--out', str(tmp_path / 'two')], env={'OMP_NUM_THREADS': '1'})
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output
    assert 'global batch 8 on 2 rank(s)' in output
    one, two = read_log(tmp_path / 'one'), read_log(tmp_path / 'two')
    curve = lambda log: [r['loss'] for r in log if 'loss' in r]
    assert len(curve(one)) == len(curve(two)) == 8
    gaps = [abs(a - b) / a for a, b in zip(curve(one), curve(two))]
    assert max(gaps) < 0.08 and sum(gaps) / len(gaps) < 0.03, (curve(one), curve(two))
    evals = [r['eval'] for r in two if 'eval' in r]
    assert len(evals) == 1 and 0 <= evals[0]['seg']['miou'] <= 1  # reduced over both ranks


def test_non_finite_loss_stops_and_names_the_term(tmp_path, monkeypatch):
    real = losses.segdepth_loss

    def broken(out, label, depth, w1, depth_loss):
        total, terms = real(out, label, depth, w1, depth_loss)
        terms['gnll'] = terms['gnll'] * float('nan')
        return total + terms['gnll'], terms
    monkeypatch.setattr(losses, 'segdepth_loss', broken)
    with pytest.raises(FloatingPointError, match='non-finite loss at step 1: loss, gnll'):
        train.main([*TINY, '--epochs', '1', '--out', str(tmp_path)])


def test_dse_trains_one_head_per_step(tmp_path):
    torch.manual_seed(0)
    model = train.main([*TINY, '--model', 'dse', '--num-members', '3', '--epochs', '1',
                        '--out', str(tmp_path)])  # 4 steps: heads 0, 1, 2, 0
    log = read_log(tmp_path)
    assert [r['step'] for r in log if 'loss' in r] == [1, 2, 3, 4]
    assert 'eval' in log[-1] and log[-1]['eval']['depth']['rmse'] > 0
    assert isinstance(model, train.DeepSubEnsemble)


@pytest.mark.slow
def test_demo_learns_the_synthetic_scenes(tmp_path):
    """The README's demo: a B0 SegDepthFormer from scratch on 2 CPU cores, a few minutes."""
    train.main(['--data', 'synthetic', '--backbone', 'b0', '--epochs', '30', '--lr', '6e-4',
                '--workers', '0', '--eval-every', '10', '--log-every', '25', '--out', str(tmp_path)])
    final = read_log(tmp_path)[-1]['eval']
    # chance: a 6-class guess has mIoU ~ 1/(2*6-1); the constant-mean depth predictor's RMSE
    val = data.build_dataset('synthetic', None, 'val', train=False)
    depths = torch.stack([val[i]['depth'] for i in range(len(val))])
    valid = depths[depths > 0]
    constant_rmse = (valid - valid.mean()).pow(2).mean().sqrt().item()
    assert final['seg']['miou'] > 0.6, final
    assert final['depth']['rmse'] < 0.5 * constant_rmse, (final, constant_rmse)
