"""Tests for losses.py: every loss against a plain numpy reference (float64, explicit loops
over pixels), plus the hand-made cases that break naive implementations: all pixels
ignored, exact zeros in the teacher's softmax, teacher == student, a variance that
underflows to 0 under bf16 autocast."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
from heads import build_model

B, K, H, W = 2, 5, 4, 3


def pixels(shape=(B, H, W)):
    """Every (b, i, j) of a (B, H, W) map, in order."""
    return np.ndindex(*shape)


def random_label(gen):
    label = torch.randint(0, K, (B, H, W), generator=gen)
    label[torch.rand(B, H, W, generator=gen) < 0.3] = losses.IGNORE_INDEX
    return label


def random_depth(gen):
    """Depths in metres with every kind of invalid value mixed in."""
    depth = torch.rand(B, H, W, generator=gen) * 80
    depth[0, 0, 0], depth[0, 0, 1], depth[0, 1, 0] = 0.0, -3.0, float('nan')
    depth[1, 0, 0], depth[1, 2, 2] = float('inf'), -float('inf')
    return depth


def random_model_out(gen, requires_grad=True):
    out = {
        'seg_logits': torch.randn(B, K, H, W, generator=gen) * 3,
        'depth_mean': torch.rand(B, H, W, generator=gen) * 80,
        'depth_var': torch.rand(B, H, W, generator=gen) * 20,
    }
    out['depth_var'][0, 3, 2] = 1e-9  # below the GNLL floor
    return {k: v.requires_grad_(requires_grad) for k, v in out.items()}


def random_teacher(gen):
    """log q with some exact zeros in q, and a teacher variance."""
    q = torch.softmax(torch.randn(B, K, H, W, generator=gen, dtype=torch.float64) * 2, dim=1)
    q[0, 1:, 0, 0] = 0.0  # a one-hot teacher pixel
    q[1, 2, 1, 1] = 0.0  # one class with q = 0
    q = q / q.sum(dim=1, keepdim=True)
    teacher_log_probs = q.log().float()  # log 0 = -inf, as the teacher may well give it
    teacher_var = torch.rand(B, H, W, generator=gen) * 30
    return teacher_log_probs, teacher_var


# -----------------------------------------------------------------------------
# numpy references, written plainly

def ref_valid(d):
    return bool(np.isfinite(d) and d > 0)


def ref_cross_entropy(logits, label):
    total, n = 0.0, 0
    for b, i, j in pixels(label.shape):
        if label[b, i, j] == 255:
            continue
        z = logits[b, :, i, j].astype(np.float64)
        log_p = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        total += -log_p[label[b, i, j]]
        n += 1
    return total / max(n, 1)


def ref_depth(per_pixel, mean, var, depth):
    total, n = 0.0, 0
    for b, i, j in pixels(depth.shape):
        if ref_valid(depth[b, i, j]):
            total += per_pixel(float(depth[b, i, j]), float(mean[b, i, j]), float(var[b, i, j]))
            n += 1
    return total / max(n, 1)


def ref_gnll(mean, var, depth, min_var=1e-4):
    def per_pixel(y, mu, s2):
        s2 = max(s2, min_var)
        return 0.5 * ((y - mu) ** 2 / s2 + math.log(s2))
    return ref_depth(per_pixel, mean, var, depth)


def ref_mse(mean, depth):
    return ref_depth(lambda y, mu, s2: (y - mu) ** 2, mean, mean, depth)


def ref_huber(mean, depth, delta):
    def per_pixel(y, mu, s2):
        e = abs(y - mu)
        return 0.5 * e ** 2 if e < delta else delta * (e - 0.5 * delta)
    return ref_depth(per_pixel, mean, mean, depth)


def ref_kl(teacher_log_probs, logits, mask):
    total, n = 0.0, 0
    for b, i, j in pixels(mask.shape):
        if not mask[b, i, j]:
            continue
        z = logits[b, :, i, j].astype(np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        for c in range(z.shape[0]):
            q = math.exp(teacher_log_probs[b, c, i, j])
            if q > 0:
                total += q * math.log(q / p[c])
        n += 1
    return total / max(n, 1)


def ref_rmsle(teacher_var, student_var, mask):
    total, n = 0.0, 0
    for b, i, j in pixels(mask.shape):
        if mask[b, i, j]:
            t, s = float(teacher_var[b, i, j]), float(student_var[b, i, j])
            total += (math.log(t + 1) - math.log(s + 1)) ** 2
            n += 1
    return math.sqrt(total / max(n, 1))


def np_(x):
    return x.detach().double().numpy()


def assert_scalar_f32(loss):
    assert loss.dtype == torch.float32 and loss.dim() == 0


def assert_zero_with_zero_grads(loss, *inputs):
    assert loss.item() == 0.0
    loss.backward()
    for x in inputs:
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# -----------------------------------------------------------------------------
# ground truth losses

def test_valid_depth(gen):
    depth = random_depth(gen)
    expected = [ref_valid(d) for d in depth.flatten().tolist()]
    assert losses.valid_depth(depth).flatten().tolist() == expected


def test_cross_entropy_matches_reference(gen):
    logits, label = torch.randn(B, K, H, W, generator=gen) * 3, random_label(gen)
    loss = losses.cross_entropy(logits, label)
    assert_scalar_f32(loss)
    assert loss.item() == pytest.approx(ref_cross_entropy(logits.numpy(), label.numpy()), rel=1e-5)


def test_cross_entropy_pools_pixels_over_the_batch():
    # image 0 has 1 labelled pixel, image 1 has 3: pooled = mean of 4 pixels, not of 2 image means
    logits = torch.zeros(2, 2, 1, 4)
    label = torch.tensor([[[0, 255, 255, 255]], [[0, 0, 0, 255]]])
    logits[1, 0] = 10.0  # image 1 is confidently right, image 0 is a coin flip
    pooled = (math.log(2) + 3 * math.log1p(math.exp(-10))) / 4
    assert losses.cross_entropy(logits, label).item() == pytest.approx(pooled, rel=1e-5)


def test_cross_entropy_confident_and_correct_is_zero():
    label = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(1))
    logits = F.one_hot(label, K).permute(0, 3, 1, 2).float() * 100  # (B, H, W, K) -> (B, K, H, W)
    assert losses.cross_entropy(logits, label).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_single_class_is_zero():
    logits = torch.randn(B, 1, H, W, requires_grad=True)
    loss = losses.cross_entropy(logits, torch.zeros(B, H, W, dtype=torch.long))
    assert_zero_with_zero_grads(loss, logits)


def test_cross_entropy_all_ignored_is_zero_with_graph(gen):
    logits = torch.randn(B, K, H, W, generator=gen, requires_grad=True)
    label = torch.full((B, H, W), losses.IGNORE_INDEX)
    loss = losses.cross_entropy(logits, label)
    assert_scalar_f32(loss)
    assert_zero_with_zero_grads(loss, logits)


def test_gaussian_nll_matches_reference(gen):
    out, depth = random_model_out(gen), random_depth(gen)
    loss = losses.gaussian_nll(out['depth_mean'], out['depth_var'], depth)
    assert_scalar_f32(loss)
    expected = ref_gnll(np_(out['depth_mean']), np_(out['depth_var']), depth.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the NaN/inf targets must not leak into the gradient
    assert torch.isfinite(out['depth_mean'].grad).all() and torch.isfinite(out['depth_var'].grad).all()


def test_gaussian_nll_hand_made():
    # one valid pixel: y = 3, mu = 1, s^2 = 2 -> 0.5 * (4/2 + log 2); the others do not count
    mean = torch.tensor([[[1.0, 5.0, 5.0]]])
    var = torch.tensor([[[2.0, 1.0, 1.0]]])
    depth = torch.tensor([[[3.0, 0.0, float('nan')]]])
    expected = 0.5 * (2.0 + math.log(2.0))
    assert losses.gaussian_nll(mean, var, depth).item() == pytest.approx(expected, rel=1e-6)


def test_gaussian_nll_floor_keeps_a_gradient():
    # s^2 = 0 is floored to min_var in value, but it still gets pushed up (gradient < 0)
    mean, var = torch.tensor([[[1.0]]]), torch.tensor([[[0.0]]], requires_grad=True)
    loss = losses.gaussian_nll(mean, var, torch.tensor([[[2.0]]]))
    assert loss.item() == pytest.approx(ref_gnll(np_(mean), np_(var), np.array([[[2.0]]])), rel=1e-6)
    loss.backward()
    assert var.grad.item() < 0 and math.isfinite(var.grad.item())


def test_gaussian_nll_all_invalid_is_zero_with_graph(gen):
    out = random_model_out(gen)
    depth = torch.tensor([0.0, -1.0, float('nan'), float('inf')]).repeat(B, H, 1)[..., :W]
    loss = losses.gaussian_nll(out['depth_mean'], out['depth_var'], depth)
    assert_zero_with_zero_grads(loss, out['depth_mean'], out['depth_var'])


def test_gaussian_nll_bf16_autocast_underflowing_variance_is_finite():
    z_mean = torch.full((1, 2, 2), 30.0, requires_grad=True)
    z_var = torch.full((1, 2, 2), -200.0, requires_grad=True)  # softplus(-200) ~ 1e-87
    depth = torch.full((1, 2, 2), 70.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mean = F.relu(F.linear(z_mean, torch.ones(2, 2)) / 2)  # a bf16 op, as in the model
        var = F.softplus(F.linear(z_var, torch.eye(2)))
        assert var.dtype == torch.bfloat16 and (var == 0).all()
        loss = losses.gaussian_nll(mean, var, depth)
    assert_scalar_f32(loss)
    assert loss.item() == pytest.approx(ref_gnll(np_(mean), np_(var), depth.numpy()), rel=1e-5)
    loss.backward()
    assert torch.isfinite(z_mean.grad).all() and torch.isfinite(z_var.grad).all()


def test_gaussian_nll_fp16_inputs_do_not_overflow():
    # (80 - 0)^2 / 1e-4 = 6.4e7 is inf in fp16 (max 65504); the loss works in float32
    mean = torch.zeros(1, 1, 2, dtype=torch.float16)
    var = torch.zeros(1, 1, 2, dtype=torch.float16)
    loss = losses.gaussian_nll(mean, var, torch.full((1, 1, 2), 80.0))
    assert_scalar_f32(loss)
    assert loss.item() == pytest.approx(0.5 * (6400 / 1e-4 + math.log(1e-4)), rel=1e-6)


def test_fp16_training_of_the_depth_head_is_stable():
    # The worst start: every pixel's variance at the floor and metres of error. Under fp16
    # autocast with GradScaler the steps must go through and the variance must rise; with a
    # 1e-6 floor, or the head's Softplus in fp16 (where it underflows to 0), every gradient
    # overflowed fp16 and GradScaler skipped every step.
    torch.manual_seed(0)
    model = build_model('depthformer', 'b0', 5, drop_path_rate=0.0).train()
    with torch.no_grad():
        model.depth_head.linear_pred.bias[1] = math.log(math.expm1(losses.MIN_VAR))  # Softplus = the floor
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)  # Adam moves each weight by ~lr a step
    scaler = torch.amp.GradScaler('cpu')
    x, depth = torch.randn(2, 3, 64, 64), torch.rand(2, 64, 64) * 5 + 1
    variances, taken = [], 0
    for _ in range(30):
        with torch.autocast('cpu', dtype=torch.float16):
            out = model(x)
            loss = losses.gaussian_nll(out['depth_mean'], out['depth_var'], depth)
        assert out['depth_var'].dtype == torch.float32 and (out['depth_var'] > 0).all()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        taken += scaler.get_scale() >= scale  # the scale is cut exactly when a step is skipped
        variances.append(out['depth_var'].mean().item())
    assert taken >= 10, taken  # after GradScaler found its scale, the steps go through
    assert variances[-1] > 1.5 * variances[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mse_matches_reference(gen):
    out, depth = random_model_out(gen), random_depth(gen)
    loss = losses.mse(out['depth_mean'], out['depth_var'], depth)
    assert_scalar_f32(loss)
    assert loss.item() == pytest.approx(ref_mse(np_(out['depth_mean']), depth.numpy()), rel=1e-5)


@pytest.mark.parametrize('delta', [1.0, 0.3, 25.0])
def test_huber_matches_reference(gen, delta):
    out, depth = random_model_out(gen), random_depth(gen)
    out['depth_mean'] = (depth.nan_to_num(0, 0, 0) + torch.randn(B, H, W, generator=gen)).requires_grad_()
    loss = losses.huber(out['depth_mean'], out['depth_var'], depth, delta=delta)
    assert_scalar_f32(loss)
    assert loss.item() == pytest.approx(ref_huber(np_(out['depth_mean']), depth.numpy(), delta), rel=1e-5)


@pytest.mark.parametrize('name', ['mse', 'huber'])
def test_ablation_losses_all_invalid_and_ignore_variance(gen, name):
    fn, out = losses.DEPTH_LOSSES[name], random_model_out(gen)
    depth = random_depth(gen)
    assert fn(out['depth_mean'], out['depth_var'], depth) == fn(out['depth_mean'], None, depth)
    loss = fn(out['depth_mean'], out['depth_var'], torch.zeros(B, H, W))
    assert_zero_with_zero_grads(loss, out['depth_mean'])


# -----------------------------------------------------------------------------
# distillation losses

@pytest.mark.parametrize('use_mask', [False, True])
def test_kl_divergence_matches_reference(gen, use_mask):
    teacher_log_probs, _ = random_teacher(gen)
    logits = torch.randn(B, K, H, W, generator=gen, requires_grad=True)
    mask = torch.rand(B, H, W, generator=gen) < 0.5 if use_mask else None
    loss = losses.kl_divergence(teacher_log_probs, logits, mask)
    assert_scalar_f32(loss)
    ref_mask = mask.numpy() if use_mask else np.ones((B, H, W), bool)
    assert loss.item() == pytest.approx(ref_kl(teacher_log_probs.numpy(), np_(logits), ref_mask), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_divergence_exact_zeros_in_q():
    # q = (1, 0, 0): KL = -log p_0; the q = 0 classes add exactly nothing, even where p = 0 too
    teacher_log_probs = torch.tensor([0.0, -float('inf'), -float('inf')]).view(1, 3, 1, 1)
    logits = torch.tensor([2.0, 0.0, -200.0]).view(1, 3, 1, 1).requires_grad_()
    loss = losses.kl_divergence(teacher_log_probs, logits)
    assert loss.item() == pytest.approx(-F.log_softmax(logits.detach(), 1)[0, 0].item(), rel=1e-6)
    loss.backward()
    p = torch.softmax(logits.detach(), dim=1)
    assert torch.allclose(logits.grad, p - torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))


def test_kl_divergence_teacher_equals_student_is_zero():
    logits = torch.randn(B, K, H, W, generator=torch.Generator().manual_seed(2), requires_grad=True)
    teacher_log_probs = F.log_softmax(logits.detach(), dim=1)
    loss = losses.kl_divergence(teacher_log_probs, logits)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-6


def test_kl_divergence_empty_mask_is_zero_with_graph(gen):
    teacher_log_probs, _ = random_teacher(gen)
    logits = torch.randn(B, K, H, W, generator=gen, requires_grad=True)
    loss = losses.kl_divergence(teacher_log_probs, logits, torch.zeros(B, H, W, dtype=torch.bool))
    assert_zero_with_zero_grads(loss, logits)


@pytest.mark.parametrize('use_mask', [False, True])
def test_rmsle_matches_reference(gen, use_mask):
    _, teacher_var = random_teacher(gen)
    student_var = (torch.rand(B, H, W, generator=gen) * 30).requires_grad_()
    mask = torch.rand(B, H, W, generator=gen) < 0.5 if use_mask else None
    loss = losses.rmsle(teacher_var, student_var, mask)
    assert_scalar_f32(loss)
    ref_mask = mask.numpy() if use_mask else np.ones((B, H, W), bool)
    assert loss.item() == pytest.approx(ref_rmsle(teacher_var.numpy(), np_(student_var), ref_mask), rel=1e-5)


def test_rmsle_hand_made():
    # one pixel: |log(e - 1 + 1) - log(0 + 1)| = 1
    loss = losses.rmsle(torch.tensor([[[math.e - 1]]]), torch.tensor([[[0.0]]]))
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_rmsle_teacher_equals_student_is_zero_with_finite_gradient(gen):
    student_var = (torch.rand(B, H, W, generator=gen) * 30).requires_grad_()
    loss = losses.rmsle(student_var.detach().clone(), student_var)
    assert_zero_with_zero_grads(loss, student_var)  # a naive sqrt gives a NaN gradient here


def test_rmsle_empty_mask_is_zero_with_graph(gen):
    _, teacher_var = random_teacher(gen)
    student_var = torch.rand(B, H, W, generator=gen, requires_grad=True)
    loss = losses.rmsle(teacher_var, student_var, torch.zeros(B, H, W, dtype=torch.bool))
    assert_zero_with_zero_grads(loss, student_var)


# -----------------------------------------------------------------------------
# Eq. 7 and Eq. 11

@pytest.mark.parametrize('depth_loss', ['gnll', 'mse', 'huber'])
def test_segdepth_loss_is_eq7(gen, depth_loss):
    out, label, depth = random_model_out(gen), random_label(gen), random_depth(gen)
    total, terms = losses.segdepth_loss(out, label, depth, depth_loss=depth_loss)
    assert set(terms) == {'ce', depth_loss}
    ce = losses.cross_entropy(out['seg_logits'], label)
    d = losses.DEPTH_LOSSES[depth_loss](out['depth_mean'], out['depth_var'], depth)
    assert terms['ce'].item() == ce.item() and terms[depth_loss].item() == d.item()
    assert total.item() == pytest.approx(ce.item() + 1.0 * d.item(), rel=1e-6)  # w1 = 1
    total_w, _ = losses.segdepth_loss(out, label, depth, w1=0.25, depth_loss=depth_loss)
    assert total_w.item() == pytest.approx(ce.item() + 0.25 * d.item(), rel=1e-6)
    assert_scalar_f32(total)


def test_segdepth_loss_one_task_models(gen):
    out, label, depth = random_model_out(gen), random_label(gen), random_depth(gen)
    seg_out = {'seg_logits': out['seg_logits']}  # SegFormer
    depth_out = {'depth_mean': out['depth_mean'], 'depth_var': out['depth_var']}  # DepthFormer
    total, terms = losses.segdepth_loss(seg_out, label, depth)
    assert set(terms) == {'ce'} and total.item() == terms['ce'].item()
    total, terms = losses.segdepth_loss(depth_out, label, depth, w1=2.0)
    assert set(terms) == {'gnll'} and total.item() == pytest.approx(2.0 * terms['gnll'].item(), rel=1e-6)


def test_unknown_depth_loss_names_the_valid_ones(gen):
    out, label, depth = random_model_out(gen), random_label(gen), random_depth(gen)
    with pytest.raises(ValueError, match=r"'gnll', 'huber', 'mse'"):
        losses.segdepth_loss(out, label, depth, depth_loss='l1')
    with pytest.raises(ValueError, match='gnll'):
        losses.emuformer_loss({'seg_logits': out['seg_logits']}, label, depth, None, None, depth_loss='GNLL')


@pytest.mark.parametrize('use_mask', [False, True])
def test_emuformer_loss_is_eq11(gen, use_mask):
    out, label, depth = random_model_out(gen), random_label(gen), random_depth(gen)
    teacher_log_probs, teacher_var = random_teacher(gen)
    mask = torch.rand(B, H, W, generator=gen) < 0.5 if use_mask else None
    total, terms = losses.emuformer_loss(out, label, depth, teacher_log_probs, teacher_var, mask=mask)
    assert set(terms) == {'ce', 'gnll', 'kl', 'rmsle'}
    ref_mask = mask.numpy() if use_mask else np.ones((B, H, W), bool)
    ce = ref_cross_entropy(np_(out['seg_logits']), label.numpy())
    gnll = ref_gnll(np_(out['depth_mean']), np_(out['depth_var']), depth.numpy())
    kl = ref_kl(teacher_log_probs.numpy(), np_(out['seg_logits']), ref_mask)
    rmsle = ref_rmsle(teacher_var.numpy(), np_(out['depth_var']), ref_mask)
    for name, ref in [('ce', ce), ('gnll', gnll), ('kl', kl), ('rmsle', rmsle)]:
        assert terms[name].item() == pytest.approx(ref, rel=1e-5), name
    assert total.item() == pytest.approx(ce + 1 * gnll + 10 * kl + 1 * rmsle, rel=1e-5)  # w1 = w3 = 1, w2 = 10
    weighted, _ = losses.emuformer_loss(out, label, depth, teacher_log_probs, teacher_var,
                                        w1=0.5, w2=2.0, w3=3.0, depth_loss='mse', mask=mask)
    mse = ref_mse(np_(out['depth_mean']), depth.numpy())
    assert weighted.item() == pytest.approx(ce + 0.5 * mse + 2 * kl + 3 * rmsle, rel=1e-5)


def test_emuformer_loss_nothing_counts_is_zero_with_graph(gen):
    out = random_model_out(gen)
    teacher_log_probs, teacher_var = random_teacher(gen)
    label = torch.full((B, H, W), losses.IGNORE_INDEX)
    nothing = torch.zeros(B, H, W, dtype=torch.bool)
    total, terms = losses.emuformer_loss(out, label, torch.zeros(B, H, W), teacher_log_probs, teacher_var,
                                         mask=nothing)
    assert all(t.item() == 0.0 for t in terms.values())
    assert_scalar_f32(total)
    assert_zero_with_zero_grads(total, *out.values())
