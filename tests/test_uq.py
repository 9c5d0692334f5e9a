"""Uncertainty methods (uq.py): Eq. 3 and Eq. 10 against numpy, and the three methods."""

import numpy as np
import pytest
import torch

import metrics
import heads
import mit
import uq
from heads import build_model, full_size


def test_summarize_matches_numpy():
    rng = np.random.default_rng(0)
    S, B, K, H, W = 4, 2, 5, 3, 4
    z = rng.normal(size=(S, B, K, H, W)) * 3
    mu = np.maximum(rng.normal(2, 1, size=(S, B, H, W)), 0)
    s2 = rng.uniform(0.1, 2, size=(S, B, H, W))
    pred = uq.summarize({'seg_logits': torch.tensor(z, dtype=torch.float32),
                         'depth_mean': torch.tensor(mu, dtype=torch.float32),
                         'depth_var': torch.tensor(s2, dtype=torch.float32)})
    q = np.zeros((B, K, H, W))
    for t in range(S):  # mean softmax, written out
        e = np.exp(z[t] - z[t].max(axis=1, keepdims=True))
        q += e / e.sum(axis=1, keepdims=True) / S
    entropy = -(q * np.log(q)).sum(axis=1)  # Eq. 3
    mean = mu.mean(axis=0)
    var = s2.mean(axis=0) + ((mu - mean) ** 2).mean(axis=0)  # Eq. 10, 1/T in both terms
    np.testing.assert_allclose(pred.probs.numpy(), q, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(pred.pred.numpy(), q.argmax(axis=1))
    np.testing.assert_allclose(pred.entropy.numpy(), entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.depth_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(pred.depth_var.numpy(), var, rtol=1e-5)


def test_summarize_of_confident_identical_samples():
    # S identical one-hot-ish samples: q is their softmax, no epistemic variance
    z = torch.full((3, 1, 4, 2, 2), -200.0)
    z[:, :, 1] = 200.0
    d = {'seg_logits': z, 'depth_mean': torch.full((3, 1, 2, 2), 5.0), 'depth_var': torch.full((3, 1, 2, 2), 0.25)}
    pred = uq.summarize(d)
    assert torch.equal(pred.pred, torch.ones(1, 2, 2, dtype=torch.long))
    assert not torch.isnan(pred.entropy).any() and pred.entropy.abs().max() < 1e-6
    assert torch.allclose(pred.depth_var, torch.full((1, 2, 2), 0.25))


@pytest.fixture(scope='module')
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 48, 64)


def test_none_is_the_model_itself(x):
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5)
    pred = uq.predict(model, x, 'none')
    out = model(x)
    assert torch.allclose(pred.probs, out['seg_logits'].softmax(1), atol=1e-6)
    assert torch.equal(pred.depth_mean, out['depth_mean']) and torch.equal(pred.depth_var, out['depth_var'])
    seg_only = uq.predict(build_model('segformer', 'b0', 5), x)
    assert seg_only.depth_mean is None and seg_only.entropy.shape == (2, 48, 64)


def test_batched_deep_ensemble_equals_the_loop(x):
    torch.manual_seed(0)
    members = [build_model('segdepthformer', 'b0', 5) for _ in range(3)]
    batched, looped = uq.DeepEnsemble(members)(x), uq.DeepEnsemble(members, batched=False)(x)
    by_hand = [m.eval()(x) for m in members]
    for k in by_hand[0]:
        assert batched[k].shape == (3, *by_hand[0][k].shape)
        for i in range(3):
            assert torch.allclose(batched[k][i], by_hand[i][k], rtol=1e-5, atol=1e-5), k
            assert torch.equal(looped[k][i], by_hand[i][k])
    a, b = uq.predict(uq.DeepEnsemble(members), x, 'de'), uq.predict(members, x, 'de')
    assert torch.allclose(a.depth_var, b.depth_var, rtol=1e-5, atol=1e-6)
    # the members disagree, so the ensemble has epistemic variance on top of the aleatoric
    assert (a.depth_var > torch.stack([o['depth_var'] for o in by_hand]).mean(0) + 1e-9).float().mean() > 0.5


def test_dse_runs_the_encoder_once(x):
    torch.manual_seed(0)
    model = build_model('dse', 'b0', 5, num_members=4)
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    pred = uq.predict(model, x, 'dse')
    assert len(calls) == 1
    heads = [model(x, head=k) for k in range(4)]
    expected = uq.summarize({k: torch.stack([h[k] for h in heads]) for k in heads[0]})
    assert torch.allclose(pred.log_probs, expected.log_probs, atol=1e-5)
    assert torch.allclose(pred.depth_var, expected.depth_var, rtol=1e-4, atol=1e-6)


def test_mc_dropout_samples_differ_only_with_dropout_on(x):
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    on = uq.mc_dropout_samples(model, x, samples=4, dropout=0.5)
    off = uq.mc_dropout_samples(model, x, samples=4, dropout=0.0)
    assert on['seg_logits'].shape == (4, 2, 5, 48, 64)
    assert not torch.allclose(on['seg_logits'][0], on['seg_logits'][1])
    ref = model(x)
    for t in range(4):  # with the rate at 0 every sample is the deterministic model
        for k in ref:
            assert torch.allclose(off[k][t], ref[k], atol=1e-5)
    assert all(not m.training for m in model.modules())  # restored
    chunked = uq.mc_dropout_samples(model, x, samples=5, dropout=0.2, chunk=2)
    assert chunked['depth_var'].shape == (5, 2, 48, 64)
    torch.manual_seed(3)
    pred = uq.predict(model, x, 'mcd', samples=4, dropout=0.5)
    torch.manual_seed(3)
    draws = uq.mc_dropout_samples(model, x, samples=4, dropout=0.5)
    assert torch.equal(pred.depth_var, uq.summarize(draws).depth_var)
    # the samples disagree (an untrained head's ReLU clips some pixels to 0 in every draw)
    assert (draws['depth_mean'].var(0) > 0).float().mean() > 0.5


def record_training_modes(model, kinds):
    """A list that every forward call of a module of `kinds` appends (type name, its training flag) to."""
    seen = []
    for m in model.modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda module, args, out: seen.append((type(module).__name__, module.training)))
    return seen


def test_decoder_mc_dropout_runs_the_encoder_once_without_dropout(x, monkeypatch):
    # the plain form, in which the Dropout2d layers run (and the hooks see them); the speed-up
    # gives the same samples (the next test)
    monkeypatch.setattr(heads, 'FAST_DROPOUT2D', False)
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    seen = record_training_modes(model, (mit.Dropout, torch.nn.Dropout2d))
    torch.manual_seed(1)
    pred = uq.predict(model, x, 'mcd-decoder', samples=5, dropout=0.5)
    assert len(calls) == 1  # one encoder pass for the five samples
    assert {('Dropout', False), ('Dropout2d', True)} == set(seen)  # only the decoders' dropout is on
    assert seen.count(('Dropout2d', True)) == 5 * 2  # five samples of the two heads
    # the samples are the deterministic features through decoders with Dropout2d masks: by hand
    torch.manual_seed(1)
    features = model.backbone(x)
    samples = []
    for _ in range(5):
        out = {}
        for task, head in (('seg', model.decode_head), ('depth', model.depth_head)):
            dropout = torch.nn.Dropout2d(0.5)  # the decoder's own, at the rate asked for, on
            head.dropout, saved = dropout, head.dropout
            out[task] = head(features)  # the textbook decoder, BatchNorm in eval mode
            head.dropout = saved
        samples.append(full_size(out, x.shape[-2:]))
    expected = uq.summarize({k: torch.stack([o[k] for o in samples]) for k in samples[0]})
    assert torch.allclose(pred.probs, expected.probs, atol=1e-5)
    assert torch.allclose(pred.depth_var, expected.depth_var, rtol=1e-4, atol=1e-6)
    # an epistemic part: the samples' depths disagree (not where ReLU makes every sample 0). That
    # the total variance exceeds one pass's on most pixels held for this draw in torch 2.13 but
    # not in 2.3 (whose seed gives other weights and masks): it depends on the draw
    assert (torch.stack([s['depth_mean'] for s in samples]).var(0) > 0).float().mean() > 0.25
    assert all(not m.training for m in model.modules())  # restored


@pytest.mark.parametrize('method', ['mcd-decoder', 'mcd'])
def test_dropout2d_on_the_weights_gives_the_plain_forms_samples(x, method, monkeypatch):
    # heads.dropped_pointwise draws the decoders' Dropout2d masks as torch does: with the same
    # seed, MC Dropout's prediction is the plain form's, up to float32 rounding of sums over 256
    # channels taken in another order
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5).eval()
    torch.manual_seed(1)
    fast = uq.predict(model, x, method, samples=3, dropout=0.5)
    monkeypatch.setattr(heads, 'FAST_DROPOUT2D', False)
    torch.manual_seed(1)
    plain = uq.predict(model, x, method, samples=3, dropout=0.5)
    assert torch.allclose(fast.probs, plain.probs, atol=1e-5)
    assert torch.allclose(fast.depth_var, plain.depth_var, rtol=1e-4, atol=1e-6)
    torch.manual_seed(2)  # another seed, other masks: the test can tell them apart
    assert not torch.allclose(uq.predict(model, x, method, samples=3, dropout=0.5).probs, plain.probs, atol=1e-5)


def test_test_time_drop_path_skips_whole_residual_branches_and_nothing_else(x):
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 5, drop_path_rate=0.5).eval()
    seen = record_training_modes(model, (mit.Dropout, torch.nn.Dropout2d, mit.DropPath))
    branches = []  # each DropPath's output, image by image: 'dropped' (0), 'kept' (input / (1 - p)) or 'other'
    for m in model.modules():
        if isinstance(m, mit.DropPath) and m.p > 0:
            m.register_forward_hook(lambda module, args, out: branches.extend(
                'dropped' if (o == 0).all() else 'kept' if torch.allclose(o, i / (1 - module.p)) else 'other'
                for o, i in zip(out, args[0])))
    torch.manual_seed(1)
    pred = uq.predict(model, x, 'drop-path', samples=4)
    assert {('Dropout', False), ('Dropout2d', False), ('DropPath', True)} == set(seen)
    assert set(branches) == {'dropped', 'kept'}  # whole branches of whole images, both seen
    assert pred.depth_var.shape == (2, 48, 64)
    assert all(not m.training for m in model.modules())  # restored
    # with a rate of 0 (a network trained without stochastic depth) every sample is the network
    plain = build_model('segdepthformer', 'b0', 5, drop_path_rate=0.0).eval()
    same, none = uq.predict(plain, x, 'drop-path', samples=3), uq.predict(plain, x, 'none')
    assert torch.allclose(same.probs, none.probs, atol=1e-6) and torch.allclose(same.depth_mean, none.depth_mean)


def test_method_must_fit_the_model(x):
    model = build_model('segformer', 'b0', 5)
    with pytest.raises(ValueError, match="unknown uncertainty method 'ensemble'"):
        uq.predict(model, x, 'ensemble')
    with pytest.raises(ValueError, match="method 'dse' does not fit a SegFormer"):
        uq.predict(model, x, 'dse')
    with pytest.raises(ValueError, match="method 'none' does not fit a DeepSubEnsemble"):
        uq.predict(build_model('dse', 'b0', 5, num_members=2), x, 'none')


def test_entropy_is_zero_for_a_class_of_probability_zero():
    # a logit far below the others gives q_c = 0 exactly: its term is 0 (the limit of q log q),
    # not 0 * -inf = NaN, which made the image's threshold NaN and every pixel "certain"
    z = torch.randn(1, 2, 3, 4, 5)  # one sample, 2 images, 3 classes
    z[:, 0, 2, 0, 0] = -1e4  # exp(-1e4) is 0 in float32
    q0 = torch.tensor([0.3, 0.7, 0.0])  # and a probability of 0 given as such, to entropy() itself
    assert uq.entropy(q0[None, :, None, None]).item() == pytest.approx(-(q0[:2] * q0[:2].log()).sum().item())
    for samples in (z, z.repeat(3, 1, 1, 1, 1)):  # one sample, and a mixture of three
        pred = uq.summarize({'seg_logits': samples})
        assert torch.isfinite(pred.entropy).all()
        q = samples[0, 0, :2, 0, 0].softmax(0)
        assert pred.entropy[0, 0, 0].item() == pytest.approx(-(q * q.log()).sum().item(), rel=1e-5)
    seg = metrics.SegMetrics(3)
    seg.update(pred.probs, torch.zeros(2, 4, 5, dtype=torch.long), pred.entropy)
    n_ac, n_au, n_ic, n_iu = seg.stats['uncertainty_counts'].tolist()
    assert n_au + n_iu > 0  # the image with the class of probability 0 has uncertain pixels too


def all_at_once(samples):
    """Eq. 3 and Eq. 10 and their decomposition from all S samples at once, in float64, with the
    plain formulas: what a non-streaming summary computes."""
    p = samples['seg_logits'].double().softmax(dim=2)  # (S, B, K, H, W)
    q = p.mean(0)
    xlogx = lambda a: torch.where(a > 0, a * a.log(), 0.0)
    mu, var = samples['depth_mean'].double(), samples['depth_var'].double()
    out = {'probs': q, 'entropy': -xlogx(q).sum(1), 'aleatoric_entropy': -xlogx(p).sum(2).mean(0),
           'depth_mean': mu.mean(0), 'aleatoric_var': var.mean(0), 'epistemic_var': mu.var(0, correction=0)}
    out['mutual_information'] = out['entropy'] - out['aleatoric_entropy']
    out['depth_var'] = out['aleatoric_var'] + out['epistemic_var']
    return out


@pytest.mark.parametrize('S', [1, 2, 7])
@pytest.mark.parametrize('channels_last', [False, True])
def test_streamed_summary_equals_all_at_once(S, channels_last):
    torch.manual_seed(S)
    z = torch.randn(S, 2, 5, 6, 7) * 4
    if channels_last:  # as the models return them
        z = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in z])
    samples = {'seg_logits': z, 'depth_mean': torch.rand(S, 2, 6, 7) * 5 + 1e3,  # far away: E[mu^2] - E[mu]^2
               'depth_var': torch.rand(S, 2, 6, 7)}                              # would cancel in float32
    pred, want = uq.summarize(samples, decompose=True), all_at_once(samples)
    for key, value in want.items():
        # float32 sums of S terms against float64; Welford keeps the spread of means exact to ~1e-4
        # of its size even 1000 m away, where the naive formula would lose it entirely
        assert torch.allclose(getattr(pred, key).double(), value, rtol=1e-4, atol=1e-5), key
    plain = uq.summarize(samples)
    assert plain.aleatoric_entropy is None and plain.epistemic_var is None
    assert torch.equal(plain.depth_var, pred.depth_var) and torch.equal(plain.entropy, pred.entropy)


def test_dse_in_chunks_equals_all_heads_at_once(x):
    torch.manual_seed(0)
    model = build_model('dse', 'b0', 5, num_members=4)
    one, all_ = uq.predict(model, x, 'dse', chunk=1), uq.predict(model, x, 'dse', chunk=4)
    assert torch.allclose(one.probs, all_.probs, atol=1e-6) and torch.allclose(one.depth_var, all_.depth_var, rtol=1e-5)


def test_the_deep_ensemble_loops_on_the_cpu_by_default():
    members = [build_model('segdepthformer', 'b0', 5) for _ in range(2)]
    assert not uq.DeepEnsemble(members).batched and uq.DeepEnsemble(members, batched=True).batched
