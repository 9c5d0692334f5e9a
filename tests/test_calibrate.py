"""calibrate.py: the temperature and the variance scale minimise the NLL (against a grid search
written here), the fitted file lands beside the checkpoint, and evaluate.py applies it."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import brute_force as bf
import calibrate
import evaluate
from heads import build_model
from test_evaluate import K, SIZE, SYNTHETIC, write_checkpoint


def test_the_temperature_minimises_the_nll():
    # labels drawn from softmax(z / 2.5): the NLL's minimum is near T = 2.5, and exactly where a
    # fine grid search over the same sample puts it
    torch.manual_seed(0)
    logits = torch.randn(20000, 6) * 3
    labels = torch.multinomial((logits / 2.5).softmax(1), 1).squeeze(1)
    t = calibrate.fit_temperature(logits, labels)
    # a grid 0.005 apart in log T: coarse enough that the NLL's curvature (~1e-5 per step) and
    # not float32's rounding (~1e-7) decides its minimum, which must be next to the fitted T
    grid = np.exp(np.linspace(math.log(t) - 0.1, math.log(t) + 0.1, 41))
    nll = [bf.nll((logits.double() / g).softmax(1).numpy(), labels.numpy()) for g in grid]
    assert abs(math.log(grid[int(np.argmin(nll))]) - math.log(t)) <= 0.005 + 1e-12
    assert abs(t - 2.5) < 0.1  # 20000 draws: the sampling error of T is ~0.03


def test_the_variance_scale_minimises_the_gaussian_nll():
    rng = np.random.default_rng(0)
    mu, var = rng.uniform(1, 5, 5000), rng.uniform(0.01, 0.5, 5000)
    y = mu + rng.normal(size=5000) * np.sqrt(var * 3.0)  # a variance three times too small
    s = np.mean((y - mu) ** 2 / var)  # what calibrate.collect sums, in closed form
    for other in (s * 0.99, s * 1.01):
        assert bf.gaussian_nll(mu, s * var, y) < bf.gaussian_nll(mu, other * var, y)
    assert abs(s - 3.0) < 0.2


def test_calibrate_then_evaluate(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / 'sdf.pt', 'segdepthformer', 0)
    args = [ckpt, '--synthetic-calib', '4', '--synthetic-size', *map(str, SIZE), '--workers', '0']
    fitted = calibrate.main(args)
    path = tmp_path / 'sdf.calibration.json'
    assert json.loads(path.read_text()) == fitted and fitted['split'] == 'calib' and fitted['num_classes'] == K
    assert fitted['seg_nll_after'] <= fitted['seg_nll_before'] and fitted['variance_scale'] > 0
    assert fitted['depth_nll_after'] <= fitted['depth_nll_before']
    # the fitted values, rounded, and the NLL before and after: one line per task, and the file
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith(f"seg: temperature {fitted['temperature']:.4g}")
    assert printed[1].endswith(f"on {fitted['seg_pixels']:,} sampled pixels; "
                               f"seg NLL {fitted['seg_nll_before']:.4f} -> {fitted['seg_nll_after']:.4f}")
    # this random network is so overconfident that the fit stops at the search's end, and says so
    at_the_end = fitted['temperature'] == pytest.approx(math.exp(4))
    assert at_the_end and '(the end of the search range, e^-4..e^4: not a minimum)' in printed[1]
    assert printed[2] == (f"depth: variance scale {fitted['variance_scale']:.4g} on {fitted['depth_pixels']:,} valid "
                          f"pixels; depth NLL {fitted['depth_nll_before']:.4f} -> {fitted['depth_nll_after']:.4f}")
    assert printed[3] == (f"depth interval: mu +- {fitted['interval_scale']:.4g} sigma for 90% coverage (split "
                          f"conformal, {fitted['interval_pixels']:,} sampled pixels)")
    assert printed[4] == f'wrote {path}'
    with pytest.raises(FileExistsError, match='--out .*sdf.calibration.json already holds a result'):
        calibrate.main(args)
    plain = evaluate.main([ckpt, *SYNTHETIC, '--split', 'calib', '--synthetic-calib', '4'])
    calibrated = evaluate.main([ckpt, *SYNTHETIC, '--split', 'calib', '--synthetic-calib', '4',
                                '--calibration', str(path)])
    assert calibrated['name'] == 'SegDepthFormer-B0, calibrated'
    # the depth NLL before and after is evaluate.py's, over the same pixels: float32 outputs
    # summed in float64 by both, in another order (1e-6 relative)
    assert fitted['depth_nll_before'] == pytest.approx(plain['depth']['nll'], rel=1e-6)
    assert fitted['depth_nll_after'] == pytest.approx(calibrated['depth']['nll'], rel=1e-6)
    # on the data it was fitted on, the fitted scale and temperature cannot make the NLL worse
    assert calibrated['depth']['nll'] <= plain['depth']['nll'] + 1e-9
    assert calibrated['seg']['nll'] <= plain['seg']['nll'] + 0.01  # the temperature saw a pixel sample
    # on the pixels it was fitted on (all of them: --pixels exceeds them) the interval holds
    # exactly the k = ceil((n + 1) 0.9) smallest scores; one pixel either way for the rounding of
    # the boundary pixel's score, computed once in calibrate.py and once in metrics.py
    assert plain['depth']['interval_coverage'] is None  # no calibration, no interval (NaN in JSON)
    n = fitted['interval_pixels']
    assert n == fitted['depth_pixels'] and calibrated['depth']['pixels'] == n
    assert abs(round(calibrated['depth']['interval_coverage'] * n) - math.ceil((n + 1) * 0.9)) <= 1
    assert calibrated['depth']['interval_width'] > 0
    with pytest.raises(ValueError, match='--calibration is the baseline of a single network'):
        evaluate.main([ckpt, ckpt, *SYNTHETIC, '--calibration', str(path)])


@pytest.mark.parametrize('change, message', [
    ({'temperature': 0}, ': the temperature must be a positive number, not 0'),
    ({'temperature': -1.0}, ': the temperature must be a positive number, not -1.0'),
    ({'variance_scale': -2.0}, ': the variance scale must be a positive number, not -2.0'),
    ({'variance_scale': float('nan')}, ': the variance scale must be a positive number, not nan'),
    ({'temperature': None}, ' has no temperature: it was fitted on a network without the seg task'),
    ({'num_classes': K + 1}, f' was fitted on {K + 1} classes; the network predicts {K}'),
    ({'temperature': 'hot'}, ': the temperature must be a positive number, not hot')])
def test_a_calibration_that_cannot_apply_is_refused_naming_the_file(tmp_path, change, message):
    model = build_model('segdepthformer', 'b0', K)
    path = tmp_path / 'c.json'
    path.write_text(json.dumps(dict({'temperature': 1.5, 'variance_scale': 0.7, 'num_classes': K}, **change)))
    with pytest.raises(ValueError) as error:
        calibrate.load_calibration(str(path), model)
    assert str(error.value) == f'--calibration {path}{message}'
    path.write_text(json.dumps({'label': 'a predict.py result'}))
    with pytest.raises(ValueError, match=f'--calibration {path}: not a calibration written by calibrate.py'):
        calibrate.load_calibration(str(path), model)


def test_a_class_count_mismatch_is_refused_before_anything_is_written(tmp_path):
    ckpt = write_checkpoint(tmp_path / 'sdf.pt', 'segdepthformer', 0)
    out = tmp_path / 'new' / 'c.json'
    with pytest.raises(ValueError, match=f'sdf.pt predicts {K} classes, nyuv2 has 40'):
        calibrate.main([ckpt, '--data', 'nyuv2', '--root', str(tmp_path / 'nowhere'), '--out', str(out)])
    assert not out.parent.exists()


@pytest.mark.parametrize('option, value, message', [  # the options every script shares: test_plumbing.py
    ('--pixels', '-5', '-5 is not an integer >= 1'),
    ('--synthetic-calib', '2.5', '2.5 is not an integer >= 1'),
    ('--split', 'test', "invalid choice: 'test'")])
def test_numeric_options_are_checked_where_parsed(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        calibrate.get_parser().parse_args(['x.pt', option, value])
    assert exit.value.code == 2 and f'argument {option}: {message}' in capsys.readouterr().err


def test_calibrated_divides_the_logits_and_scales_the_variance():
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', K).eval()
    x = torch.randn(1, 3, 64, 64)
    out, scaled = model(x), calibrate.Calibrated(model, 2.0, 3.0)(x)
    assert torch.allclose(scaled['seg_logits'], out['seg_logits'] / 2) and torch.allclose(scaled['depth_var'], out['depth_var'] * 3)
    assert torch.equal(scaled['depth_mean'], out['depth_mean'])
    assert torch.allclose(F.softmax(scaled['seg_logits'], 1).sum(1), torch.ones(1, 64, 64))


def test_the_conformal_interval_covers_the_target_within_the_finite_sample_bound():
    # the scale is the k-th smallest score, k = ceil((n + 1) c): for the scores 1..n, k itself
    n, target = 100, 0.9
    k = math.ceil((n + 1) * target)  # 91: not ceil(n c) = 90
    assert calibrate.conformal_scale(torch.randperm(n).double() + 1, target) == k
    # exchangeable pixels: sigma anything, y - mu = 2.5 sigma Z with Z standard normal, so a
    # score |y - mu| / sigma is 2.5 |Z| and an interval mu +- q sigma covers erf(q / (2.5 sqrt 2))
    # of new pixels exactly. Over calibration sets of n continuous scores, the mean of that
    # coverage is k / (n + 1), inside the guarantee [c, c + 1 / (n + 1)]; 4000 sets give it to
    # about 0.03 / sqrt(4000) = 5e-4 (one std), so 2e-3 is four standard deviations.
    generator = torch.Generator().manual_seed(0)
    covered = []
    for _ in range(4000):
        sigma = torch.rand(n, generator=generator, dtype=torch.float64) * 3 + 0.1
        error = 2.5 * sigma * torch.randn(n, generator=generator, dtype=torch.float64)
        q = calibrate.conformal_scale(error.abs() / sigma, target)
        covered.append(math.erf(q / (2.5 * math.sqrt(2))))
    mean = sum(covered) / len(covered)
    assert abs(mean - k / (n + 1)) <= 2e-3 and target <= k / (n + 1) <= target + 1 / (n + 1), mean
    assert calibrate.conformal_scale(torch.rand(5, dtype=torch.float64), 0.9) == math.inf  # (5 + 1) 0.9 > 5


def test_an_old_calibration_without_an_interval_still_applies(tmp_path):
    model = build_model('segdepthformer', 'b0', K)
    path = tmp_path / 'c.json'
    path.write_text(json.dumps({'temperature': 1.5, 'variance_scale': 0.7, 'num_classes': K}))
    assert calibrate.load_calibration(str(path), model).interval_scale is None
    path.write_text(json.dumps({'temperature': 1.5, 'variance_scale': 0.7, 'num_classes': K, 'interval_scale': -1}))
    with pytest.raises(ValueError, match='the interval scale must be a positive number, not -1'):
        calibrate.load_calibration(str(path), model)
