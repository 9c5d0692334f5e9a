"""train.py: the schedule, exact resume after a kill, one run per directory, checkpoints that are
never non-finite, the global-batch loss under torchrun, and (slow) a real run."""

import fcntl
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

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


def without_times(log):
    """A log's records without what a wall clock decides."""
    return [{k: v for k, v in r.items() if k not in ('ms_per_step', 'images_per_s')} for r in log]


def kill_at(process, last, step, timeout=300):
    """SIGKILL `process` once its last.pt holds at least `step`; -> the step last.pt holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last.exists() and torch.load(last, weights_only=True)['step'] >= step:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return torch.load(last, weights_only=True)['step']


def assert_same_checkpoints(a, b, optimizer=True):
    """The same step and weights, and (last.pt; best.pt has none) the same AdamW moments."""
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a['step'] == b['step']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    if not optimizer:
        return
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])


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


def test_killed_run_resumes_exactly_and_its_log_reads_as_one_run(tmp_path):
    # a checkpoint every step and a log line every 3: the kill falls inside a log window, and
    # the records logged after the checkpoint are written again after the resume
    common = ['train.py', *TINY, '--epochs', '3', '--save-every', '1', '--log-every', '3', '--eval-every', '1']
    straight = run_script([*common, '--out', str(tmp_path / 'a')])
    assert straight.wait(300) == 0, straight.stdout.read()

    killed = run_script([*common, '--out', str(tmp_path / 'b')])
    last = tmp_path / 'b' / 'last.pt'
    stopped_at = kill_at(killed, last, 5)
    assert 5 <= stopped_at < 12, 'the run was not killed mid-run'

    # resumed with two data workers where it ran with none: the batches are the same to the bit
    resumed = run_script([*common, '--out', str(tmp_path / 'b'), '--resume', '--workers', '2'])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f'resumed from {last} at step {stopped_at}' in output
    assert_same_checkpoints(tmp_path / 'a' / 'last.pt', last)
    assert_same_checkpoints(tmp_path / 'a' / 'best.pt', tmp_path / 'b' / 'best.pt', optimizer=False)
    assert without_times(read_log(tmp_path / 'a')) == without_times(read_log(tmp_path / 'b'))


def test_augmentation_is_the_same_in_workers_and_in_the_main_process():
    # a worker has one thread, the main process two: resizing used to round differently
    dataset = train.SeededSamples(data.build_dataset('synthetic', None, 'train', train=True, num_images=6,
                                                     teacher_jitter=data.TEACHER_JITTER), seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        main = [dataset[i] for i in range(6)]
    finally:
        torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    for a, b in zip(main, loader):
        for key in ('image', 'image_teacher', 'label', 'depth'):
            assert torch.equal(a[key], b[key]), (a['name'], key)


def test_a_run_directory_holds_one_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    train.main([*TINY, '--epochs', '1', '--out', out])
    best = (tmp_path / 'run' / 'best.pt').read_bytes()
    log = (tmp_path / 'run' / 'log.jsonl').read_text()
    with pytest.raises(FileExistsError, match=f'--out {out} already holds a run.*--resume.*delete'):
        train.main([*TINY, '--epochs', '1', '--lr', '1e-3', '--out', out])
    assert re.search(rf"done: best seg mIoU [0-9.]+ at step 4; wrote {out}/best.pt, {out}/last.pt, {out}/log.jsonl\n$",
                     capsys.readouterr().out)
    saved = torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)
    assert set(saved) == {'model', 'config', 'meta', 'step', 'best', 'args'}  # no optimizer: resuming is last.pt's
    assert (tmp_path / 'run' / 'best.pt').read_bytes() == best  # nothing was touched
    assert (tmp_path / 'run' / 'log.jsonl').read_text() == log


def test_resume_stops_with_a_message_that_names_the_file(tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(FileNotFoundError, match=f'--resume: {out / "last.pt"} does not exist'):
        train.main([*TINY, '--epochs', '1', '--out', str(out), '--resume'])
    train.main([*TINY, '--epochs', '1', '--out', str(out)])
    saved = (out / 'last.pt').read_bytes()
    with pytest.raises(ValueError, match=r'other settings: --backbone b0 in the checkpoint, b2 now; '
                                         r'--lr 0.0006 in the checkpoint, 0.001 now\. Resume with the same ones'):
        train.main([*TINY, '--epochs', '1', '--backbone', 'b2', '--lr', '1e-3', '--out', str(out), '--resume'])
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    torch.save({**ckpt, 'rng': ckpt['rng'] * 2}, out / 'last.pt')  # as saved by two ranks
    with pytest.raises(ValueError, match=r'saved by 2 rank\(s\), this run has 1; resume on 2'):
        train.main([*TINY, '--epochs', '1', '--out', str(out), '--resume'])
    torch.save({**ckpt, 'meta': {**ckpt['meta'], 'objective': 'eq11'}}, out / 'last.pt')
    with pytest.raises(ValueError, match=r'other settings: objective: eq11 in the checkpoint, eq7 now'):
        train.main([*TINY, '--epochs', '1', '--out', str(out), '--resume'])
    torch.save(ckpt['model']['backbone.norm1.weight'], out / 'last.pt')  # a plain tensor
    with pytest.raises(ValueError, match=r'is not a last.pt of train.py or distill.py'):
        train.main([*TINY, '--epochs', '1', '--out', str(out), '--resume'])
    torch.save({**ckpt, 'model': {**ckpt['model'], 'backbone.norm1.weight': ckpt['model']['backbone.norm1.weight'] * math.nan}},
               out / 'last.pt')
    with pytest.raises(ValueError, match=r'holds non-finite weights \(backbone.norm1.weight\)'):
        train.main([*TINY, '--epochs', '1', '--out', str(out), '--resume'])
    (out / 'last.pt').write_bytes(saved[:len(saved) // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=f'{out / "last.pt"}: not a readable PyTorch checkpoint'):
        train.main([*TINY, '--epochs', '2', '--out', str(out), '--resume'])


def test_bad_flags_are_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match='--data nyuv2 needs --root'):
        train.main(['--data', 'nyuv2', '--out', str(tmp_path / 'a')])
    with pytest.raises(ValueError, match="--crop 16 64 is below the encoder's minimum of 29x29"):
        train.main([*TINY, '--crop', '16', '64', '--out', str(tmp_path / 'b')])
    with pytest.raises(ValueError, match="--synthetic-size 20 20 is below"):
        train.main([*TINY, '--synthetic-size', '20', '20', '--out', str(tmp_path / 'c')])
    blocked = tmp_path / 'file'
    blocked.write_text('a file where the run directory should go')
    with pytest.raises(OSError, match=f'--out {blocked / "run"}: cannot write'):
        train.main([*TINY, '--out', str(blocked / 'run')])
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    helped = train.get_parser().format_help()
    assert 'segformer,depthformer,segdepthformer,dse' in helped and 'cuda or cpu' in helped


def test_validation_with_nothing_to_count_still_keeps_a_best_checkpoint(tmp_path, monkeypatch, capsys):
    real = data.build_dataset

    def unlabelled_val(name, root, split, train, **kw):  # every label ignored, every depth missing
        dataset = real(name, root, split, train, **kw)
        dataset.transform = lambda *a, t=dataset.transform: {**t(*a), 'label': torch.full_like(t(*a)['label'], 255),
                                                            'depth': torch.zeros_like(t(*a)['depth'])}
        return dataset
    monkeypatch.setattr(data, 'build_dataset', lambda *a, **kw: unlabelled_val(*a, **kw) if a[2] == 'val'
                        else real(*a, **kw))
    train.main([*TINY, '--epochs', '2', '--eval-every', '1', '--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'no labelled pixel' in out and 'no valid ground-truth depth' in out
    evals = [r['eval'] for r in read_log(tmp_path) if 'eval' in r]
    assert len(evals) == 2 and evals[0]['seg']['miou'] is None and evals[0]['depth']['rmse'] is None
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['step'] == 4 and best['best'] != best['best']  # the first evaluation's, score NaN


def test_non_finite_loss_stops_and_names_the_term(tmp_path, monkeypatch):
    real = losses.segdepth_loss

    def broken(out, label, depth, w1, depth_loss, across_ranks):
        total, terms = real(out, label, depth, w1, depth_loss, across_ranks)
        terms['gnll'] = terms['gnll'] * float('nan')
        return total + terms['gnll'], terms
    monkeypatch.setattr(losses, 'segdepth_loss', broken)
    with pytest.raises(FloatingPointError, match='non-finite loss at step 1: loss, gnll.*no checkpoint was saved'):
        train.main([*TINY, '--epochs', '1', '--out', str(tmp_path)])


def test_a_diverged_run_never_saves_non_finite_weights(tmp_path):
    # lr 1e3 blows the weights up within a few steps; the checkpoint the message names loads,
    # is finite everywhere, and resumes
    out = tmp_path / 'run'
    with pytest.raises(FloatingPointError, match=f'the last good checkpoint is {out / "last.pt"}') as e:
        train.main([*TINY, '--epochs', '4', '--lr', '1e3', '--save-every', '1', '--out', str(out)])
    assert 'non-finite' in str(e.value)
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert not (out / 'best.pt').exists() or all(
        torch.isfinite(v).all() for v in torch.load(out / 'best.pt', weights_only=True)['model'].values()
        if v.is_floating_point())
    with pytest.raises(FloatingPointError):  # it resumes, and diverges again at this lr
        train.main([*TINY, '--epochs', '4', '--lr', '1e3', '--save-every', '1', '--out', str(out), '--resume'])


def test_dse_trains_one_head_per_step(tmp_path):
    torch.manual_seed(0)
    model = train.main([*TINY, '--model', 'dse', '--num-members', '3', '--epochs', '1',
                        '--out', str(tmp_path)])  # 4 steps: heads 0, 1, 2, 0
    log = read_log(tmp_path)
    assert [r['step'] for r in log if 'loss' in r] == [1, 2, 3, 4]
    assert 'eval' in log[-1] and log[-1]['eval']['depth']['rmse'] > 0
    assert isinstance(model, train.heads.DeepSubEnsemble)


# ---------------------------------------------------------------------------------------------
# several ranks

def _gradient_rank(rank, port, batch, result):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DDP(build_model('segdepthformer', 'b0', 6).eval())  # eval: BatchNorm's statistics aside
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
    loss, _ = losses.segdepth_loss(model(half['image']), half['label'], half['depth'], across_ranks=True)
    loss.backward()
    if rank == 0:
        result.update({n: p.grad.clone() for n, p in model.module.named_parameters()})
    dist.destroy_process_group()


def test_two_ranks_take_the_gradient_of_the_global_batch():
    # four images, two per rank, with very different numbers of labelled and valid pixels, so
    # that a rank-mean averaged over ranks would weigh them wrongly
    torch.manual_seed(0)
    batch = {'image': torch.randn(4, 3, 64, 64), 'label': torch.randint(6, (4, 64, 64)),
             'depth': torch.rand(4, 64, 64) * 5 + 0.5}
    batch['label'][:2, :, 8:] = 255
    batch['depth'][2:, 4:] = 0
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 6).eval()
    loss, _ = losses.segdepth_loss(model(batch['image']), batch['label'], batch['depth'])
    loss.backward()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_gradient_rank, args=(port, batch, result), nprocs=2)
        ranks = dict(result)
    for n, p in model.named_parameters():
        # float sums in another order: 1e-5 of the largest gradient of the tensor
        assert (ranks[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-12, n


TWO_RANKS = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
RANKS_ENV = {'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}  # tests/ranks.py imports the project


def assert_clean_ends(output):
    """No rank aborted at its exit (the gloo threads outliving the interpreter) or printed a
    traceback; the agent's own report of a failed worker is torchrun's, not ours."""
    assert 'terminate called' not in output and 'SIGABRT' not in output, output
    assert not any(line.startswith('[rank') and 'Traceback' in line for line in output.splitlines()), output


def test_torchrun_two_ranks_follows_the_single_process_loss_curve(tmp_path):
    # The same global batch of 8 (4 per rank). No dropout or stochastic depth, so the only
    # difference left is BatchNorm's statistics, over 4 images per rank instead of 8
    # (SyncBatchNorm needs a GPU).
    common = [*TINY, '--synthetic-train', '32', '--batch-size', '8', '--epochs', '2',
              '--dropout', '0', '--drop-path', '0']
    single = run_script(['train.py', *common, '--out', str(tmp_path / 'one')])
    assert single.wait(300) == 0, single.stdout.read()
    ddp = run_script([*TWO_RANKS, 'tests/ranks.py', 'threads', *common, '--out', str(tmp_path / 'two')], env=RANKS_ENV)
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output
    assert 'global batch 8 on 2 rank(s)' in output
    assert_clean_ends(output)
    # every gradient has its parameter's strides, so DDP's buckets take it as it is
    assert 'Grad strides do not match bucket view strides' not in output, output
    # the process group, destroyed on the way out of train.main, took its gloo threads with it
    threads = [line for line in output.splitlines() if 'threads after train.main' in line]
    assert len(threads) == 2 and not any('gloo' in line for line in threads), threads
    one, two = read_log(tmp_path / 'one'), read_log(tmp_path / 'two')
    curve = lambda log: [r['loss'] for r in log if 'loss' in r]
    assert len(curve(one)) == len(curve(two)) == 8
    gaps = [abs(a - b) / a for a, b in zip(curve(one), curve(two))]
    assert max(gaps) < 0.08 and sum(gaps) / len(gaps) < 0.03, (curve(one), curve(two))
    evals = [r['eval'] for r in two if 'eval' in r]
    assert len(evals) == 1 and 0 <= evals[0]['seg']['miou'] <= 1  # reduced over both ranks


def test_torchrun_an_error_on_one_rank_ends_every_rank_in_one_line(tmp_path):
    ddp = run_script([*TWO_RANKS, 'tests/ranks.py', 'fail', *TINY, '--epochs', '2', '--out', str(tmp_path)],
                     env=RANKS_ENV)
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode != 0
    assert 'ranks.py: rank 1 stops at its third step' in output, output
    assert 'ranks.py: rank 0: another rank stopped, so a collective failed' in output, output
    assert_clean_ends(output)


def test_torchrun_ctrl_c_ends_every_rank_in_one_line(tmp_path):
    # Ctrl-C sends SIGINT to the terminal's whole process group: torchrun and both ranks
    ddp = run_script([*TWO_RANKS, 'train.py', *TINY, '--epochs', '100', '--out', str(tmp_path)],
                     env={'OMP_NUM_THREADS': '1'}, start_new_session=True)
    lines = []
    for line in ddp.stdout:  # until training runs
        lines.append(line)
        if line.startswith('step 2/'):
            break
    os.killpg(ddp.pid, signal.SIGINT)
    output = ''.join(lines) + ddp.communicate(timeout=120)[0]
    assert ddp.returncode != 0
    assert output.count('train.py: interrupted') == 2, output
    assert_clean_ends(output)


@pytest.mark.slow
def test_demo_learns_the_synthetic_scenes(tmp_path):
    """The README's demo: a B0 SegDepthFormer from scratch on 2 CPU cores, a few minutes."""
    train.main(['--data', 'synthetic', '--backbone', 'b0', '--epochs', '24', '--lr', '6e-4',
                '--workers', '0', '--eval-every', '10', '--log-every', '25', '--out', str(tmp_path)])
    final = read_log(tmp_path)[-1]['eval']
    # chance: a 6-class guess has mIoU ~ 1/(2*6-1); the constant-mean depth predictor's RMSE
    val = data.build_dataset('synthetic', None, 'val', train=False)
    depths = torch.stack([val[i]['depth'] for i in range(len(val))])
    valid = depths[depths > 0]
    constant_rmse = (valid - valid.mean()).pow(2).mean().sqrt().item()
    assert final['seg']['miou'] > 0.6, final
    assert final['depth']['rmse'] < 0.5 * constant_rmse, (final, constant_rmse)


# ---------------------------------------------------------------------------------------------
# the flags, the run directory and its log

def test_each_data_set_has_its_recipe_and_a_flag_overrides_it():
    parse = lambda *argv: train.apply_recipe(args := train.get_parser().parse_args(argv), train.RECIPES[args.data]) or args
    demo = parse()  # `python train.py`: the CPU demo
    assert (demo.data, demo.backbone, demo.lr, demo.epochs) == ('synthetic', 'b0', 6e-4, 24)
    paper = parse('--data', 'nyuv2', '--root', 'x')
    assert (paper.backbone, paper.lr, paper.epochs, paper.batch_size) == ('b2', 6e-5, 100, 8)
    assert parse('--data', 'cityscapes', '--root', 'x').epochs == 250
    assert parse('--data', 'cityscapes', '--root', 'x', '--epochs', '3', '--lr', '1e-4').epochs == 3


@pytest.mark.parametrize('flag, value, message', [
    ('--epochs', '0', '0 is not an integer >= 1'), ('--epochs', '-1', 'an integer >= 1'),
    ('--batch-size', '-4', '>= 1'), ('--batch-size', '0', '>= 1'), ('--save-every', '0', '>= 1'),
    ('--log-every', '0', '>= 1'), ('--num-members', '0', '>= 1'), ('--synthetic-val', '0', '>= 1'),
    ('--synthetic-train', '0', '>= 1'), ('--workers', '-1', '>= 0'), ('--dropout', '1.5', r'in \[0, 1\)'),
    ('--drop-path', '-0.1', r'in \[0, 1\)'), ('--lr', '0', '> 0'), ('--max-depth', 'nan', '> 0')])
def test_numeric_options_are_checked_where_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_parser().parse_args([flag, value])
    assert e.value.code == 2
    assert re.search(f'argument {flag}: .*{message}', capsys.readouterr().err)


def test_a_run_directory_is_held_by_one_live_process(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    with open(out / '.lock', 'a') as held:  # as a running train.py holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OSError, match=f'--out {out} is in use by another process'):
            train.main([*TINY, '--out', str(out)])
        with pytest.raises(OSError, match='in use by another process'):
            train.main([*TINY, '--out', str(out), '--resume'])
    # the holder ended (a killed process's locks end with it): the directory is free again
    with train.run_directory(train.get_parser().parse_args(['--out', str(out)])):
        pass


def test_a_refused_run_leaves_no_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='--resume'):
        train.main([*TINY, '--out', str(tmp_path / 'new'), '--resume'])
    assert not (tmp_path / 'new').exists()


def test_a_run_stopped_before_its_first_checkpoint_names_the_way_out(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('')  # a run killed (or out of disk) before last.pt
    args = train.get_parser().parse_args(['--out', str(out)])
    for resume in (False, True):
        args.resume = resume
        with pytest.raises(FileExistsError, match=f'no last.pt.*start over with `rm {out}/log.jsonl`'):
            train.check_run(args)
    (out / 'log.jsonl').unlink()  # the way out it names
    args.resume = False
    train.check_run(args)


def test_resume_compares_paths_not_strings(tmp_path, monkeypatch):
    (tmp_path / 'weights.pt').write_bytes(b'')
    saved = vars(train.get_parser().parse_args(['--out', str(tmp_path / 'old'), '--init', str(tmp_path / 'weights.pt')]))
    monkeypatch.chdir(tmp_path)
    # a moved run directory, the same file by a relative path: nothing changed
    now = train.get_parser().parse_args(['--out', 'moved/', '--init', './weights.pt', '--resume'])
    assert train.changed_flags(now, saved) == []
    (tmp_path / 'other.pt').write_bytes(b'')
    now.init = 'other.pt'
    assert train.changed_flags(now, saved) == [f"--init {tmp_path / 'weights.pt'} in the checkpoint, other.pt now"]


@pytest.mark.parametrize('tail', [b'{"step": 4, "lo', b'\0' * 64, b''])
def test_a_torn_log_is_cut_back_to_the_checkpoint(tmp_path, tail):
    log = tmp_path / 'log.jsonl'
    lines = [json.dumps({'step': s, 'loss': 1.0}).encode() + b'\n' for s in (1, 2, 3)]
    log.write_bytes(b''.join(lines) + tail)  # a power loss while the line of step 4 was written
    note = train.cut_log(str(log), 2)
    assert log.read_bytes() == b''.join(lines[:2])
    assert (note is None) == (tail == b'') and (note is None or 'dropped a damaged line' in note)
    log.unlink()
    assert 'was missing' in train.cut_log(str(log), 2) and log.read_bytes() == b''


def test_a_full_disk_while_logging_names_the_file(tmp_path):
    if not os.path.exists('/dev/full'):
        pytest.skip('needs /dev/full')
    (tmp_path / 'log.jsonl').symlink_to('/dev/full')
    with pytest.raises(OSError, match=f'could not append to {tmp_path}/log.jsonl .*--resume continues'):
        train.write_log(str(tmp_path), {'step': 1})


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / 'run'
    argv = ['train.py', *TINY, '--epochs', '100', '--save-every', '1', '--out', str(out)]
    process = run_script(argv)
    lines = []
    for line in process.stdout:  # until training runs
        lines.append(line)
        if line.startswith('step 2/'):
            break
    process.send_signal(signal.SIGINT)
    output = ''.join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    last = output.strip().splitlines()[-1]
    assert re.fullmatch(rf'train.py: interrupted at step \d+; {out}/last.pt holds step \d+; continue with: '
                        rf'python {re.escape(" ".join(argv))} --resume', last), output
    assert 'Traceback' not in output
