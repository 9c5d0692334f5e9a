"""distill.py: EMUFormer end to end on tiny synthetic runs, the teacher's wiring, the student's
architecture from its checkpoints, and an exact resume after a kill."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import data
import distill
import heads
import losses
import train
import uq
from heads import build_model
from test_train import ROOT, assert_same_checkpoints, kill_at, read_log, run_script, without_times

TINY = ['--data', 'synthetic', '--synthetic-train', '8', '--synthetic-val', '4',
        '--synthetic-size', '64', '64', '--batch-size', '4', '--lr', '6e-4', '--workers', '0',
        '--log-every', '1', '--eval-every', '0', '--epochs', '1']


@pytest.fixture(scope='module')
def members(tmp_path_factory):
    """A Deep Ensemble of three tiny B0 SegDepthFormers (different seeds) and a SegFormer."""
    root = tmp_path_factory.mktemp('members')
    paths = []
    for seed in range(3):
        train.main([*TINY, '--backbone', 'b0', '--seed', str(seed), '--out', str(root / f'm{seed}')])
        paths.append(str(root / f'm{seed}' / 'last.pt'))
    train.main([*TINY, '--backbone', 'b0', '--model', 'segformer', '--out', str(root / 'seg')])
    return paths, str(root / 'seg' / 'last.pt')


def test_distill_end_to_end_reports_the_students_uncertainty(members, tmp_path):
    paths, _ = members
    # no --backbone: the student is a B0 like its init, not the parser's B2
    student = distill.main([*TINY, '--teacher', *paths, '--student-init', paths[0], '--out', str(tmp_path)])
    assert student.config['backbone'] == 'b0'
    log = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    steps = [r for r in log if 'loss' in r]
    assert len(steps) == 2 and all({'ce', 'gnll', 'kl', 'rmsle'} <= set(r) for r in steps)
    for r in steps:  # Eq. 11 with the paper's weights
        assert r['loss'] == pytest.approx(r['ce'] + r['gnll'] + 10 * r['kl'] + r['rmsle'], rel=1e-5)
    final = log[-1]['eval']
    for task in ('seg', 'depth'):
        for key in ('p_accurate_certain', 'p_uncertain_inaccurate', 'pavpu'):
            assert 0 <= final[task][key] <= 1
    init = torch.load(paths[0], weights_only=True)['model']
    assert any(not torch.equal(v, init[k]) for k, v in student.state_dict().items())  # it trained
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['meta']['objective'] == 'eq11'


def test_the_teacher_sees_the_jittered_image_and_its_targets_reach_eq_11(members, tmp_path, monkeypatch):
    paths, _ = members
    # the jitter replaced by a flat grey, so the teacher's input is recognisable
    monkeypatch.setattr(data, 'color_jitter', lambda image, *a: torch.full_like(image, 0.5))
    seen = []
    real_predict, real_loss = uq.predict, losses.emuformer_loss

    def spy_predict(model, images, method='none', **kw):
        pred = real_predict(model, images, method, **kw)
        if method == 'de':
            seen.append({'teacher_input': images, 'pred': pred, 'ensemble': model})
        return pred

    def spy_loss(out, label, depth, log_probs, var, *a, **kw):
        seen[-1].update(log_probs=log_probs, var=var)
        return real_loss(out, label, depth, log_probs, var, *a, **kw)
    monkeypatch.setattr(uq, 'predict', spy_predict)
    monkeypatch.setattr(losses, 'emuformer_loss', spy_loss)
    distill.main([*TINY, '--teacher', *paths, '--out', str(tmp_path)])
    assert len(seen) == 2  # once per step
    grey = (0.5 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    for s in seen:
        x = s['teacher_input']  # (B, 3, H, W): grey where the image is, 0 in the crop's padding
        assert isinstance(s['ensemble'], uq.DeepEnsemble) and len(s['ensemble']) == 3
        assert ((x - grey[:, None, None]).abs() < 1e-5).logical_or(x == 0).all()
        again = uq.summarize(s['ensemble'](x))  # the targets are the ensemble's Eq. 3/10 on that input
        assert torch.allclose(s['log_probs'], again.log_probs, atol=1e-5)
        assert torch.allclose(s['var'], again.depth_var, rtol=1e-4, atol=1e-6)


def test_bad_teachers_and_students_are_named(members, tmp_path):
    paths, segformer = members
    with pytest.raises(ValueError, match=f'the teacher must be SegDepthFormers.*{segformer}'):
        distill.main([*TINY, '--teacher', segformer, '--out', str(tmp_path / 'a')])
    with pytest.raises(ValueError, match='one architecture'):
        distill.main([*TINY, '--teacher', paths[0], segformer, '--out', str(tmp_path / 'b')])
    with pytest.raises(ValueError, match='student is a SegDepthFormer, not a dse'):
        distill.main([*TINY, '--model', 'dse', '--teacher', *paths, '--out', str(tmp_path / 'c')])
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        distill.main([*TINY, '--teacher', str(tmp_path / 'nope.pt'), '--out', str(tmp_path / 'd')])
    # a real conflict, in one line
    with pytest.raises(ValueError, match=r'^--backbone b2 conflicts with --student-init .*m0/last.pt, a b0 '
                                         r'SegDepthFormer; leave --backbone out$'):
        distill.main([*TINY, '--backbone', 'b2', '--teacher', *paths, '--student-init', paths[0],
                      '--out', str(tmp_path / 'e')])
    with pytest.raises(ValueError, match='--student-init .* is not a SegDepthFormer'):
        distill.main([*TINY, '--teacher', *paths, '--student-init', segformer, '--out', str(tmp_path / 'f')])
    # a single network, or a single Deep Sub-Ensemble, is no Deep Ensemble teacher
    with pytest.raises(ValueError, match=r'^--teacher .*m0/last.pt: a Deep Ensemble teacher needs the checkpoints '
                                         r'of two or more SegDepthFormers'):
        distill.main([*TINY, '--teacher', paths[0], '--out', str(tmp_path / 'g')])
    dse = build_model('dse', 'b0', 6, num_members=2)
    torch.save({'model': dse.state_dict(), 'config': dse.config}, tmp_path / 'dse.pt')
    with pytest.raises(ValueError, match=f'^the teacher must be SegDepthFormers with 6 classes; {tmp_path}/dse.pt is dse-b0'):
        distill.main([*TINY, '--teacher', str(tmp_path / 'dse.pt'), '--out', str(tmp_path / 'h')])
    assert not any((tmp_path / d).exists() for d in 'abcdefgh')  # no empty run directory left behind


def test_resume_refuses_another_teacher(members, tmp_path):
    paths, _ = members
    teacher = [tmp_path / 't0.pt', tmp_path / 't1.pt']
    for source, copy in zip(paths, teacher):
        shutil.copy(source, copy)
    common = [*TINY, '--teacher', *map(str, teacher), '--out', str(tmp_path / 'run')]
    distill.main(common)
    digests = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['meta']['teacher']
    assert digests == [distill.weights_digest(heads.load_model(p)) for p in paths[:2]] and digests[0] != digests[1]
    shutil.copy(paths[2], teacher[1])  # another member of the same architecture, in place
    with pytest.raises(ValueError, match=r"other settings: teacher: \['[0-9a-f]{64}', '[0-9a-f]{64}'\] in the checkpoint"):
        distill.main([*common, '--resume'])


def test_killed_distillation_resumes_exactly(members, tmp_path):
    # building the teacher draws from the random state: it must come before the resumed state
    paths, _ = members
    common = ['distill.py', *TINY, '--epochs', '4', '--synthetic-train', '12', '--save-every', '1',
              '--log-every', '2', '--eval-every', '2', '--dropout', '0.1', '--teacher', *paths,
              '--student-init', paths[0]]
    straight = run_script([*common, '--out', str(tmp_path / 'a')])
    assert straight.wait(300) == 0, straight.stdout.read()
    killed = run_script([*common, '--out', str(tmp_path / 'b')])
    stopped_at = kill_at(killed, tmp_path / 'b' / 'last.pt', 4)
    assert 4 <= stopped_at < 12, 'the run was not killed mid-run'
    resumed = run_script([*common, '--out', str(tmp_path / 'b'), '--resume'])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert_same_checkpoints(tmp_path / 'a' / 'last.pt', tmp_path / 'b' / 'last.pt')
    a, b = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True), torch.load(tmp_path / 'b' / 'last.pt',
                                                                                  weights_only=True)
    for k, v in a['model'].items():  # BatchNorm's running statistics too
        assert torch.equal(v, b['model'][k]), k
    assert without_times(read_log(tmp_path / 'a')) == without_times(read_log(tmp_path / 'b'))


def test_no_arguments_run_the_demo_and_a_data_set_needs_its_teacher(monkeypatch, tmp_path):
    import demo
    called = []
    monkeypatch.setattr(demo, 'main', lambda argv, script: called.append((argv, script)))
    distill.main([])
    assert called == [(['--stage', 'emuformer'], 'distill.py')]  # which it names in what it prints
    refused = subprocess.run([sys.executable, 'distill.py', '--data', 'nyuv2', '--root', str(tmp_path),
                              '--out', str(tmp_path / 'run')], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith('distill.py: --teacher is needed') and refused.stderr.count('\n') == 1
    assert not (tmp_path / 'run').exists()
