"""
Every training objective of the paper, all of it in this single file.

Landgraf et al., "Efficient Multi-task Uncertainties for Joint Semantic Segmentation and
Monocular Depth Estimation", Sections 3.2-3.3 and 6.3:

    cross_entropy   Eq. 2   segmentation, against the ground truth labels
    gaussian_nll    Eq. 6   depth, against the ground truth depth (the paper's default)
    mse, huber      Sec 6.3 depth, the ablation of Tables 9/10 (they ignore the variance)
    kl_divergence   Eq. 8   distils the teacher's mean softmax into the student
    rmsle           Eq. 9   distils the teacher's depth variance (Eq. 10) into the student
    segdepth_loss   Eq. 7   L = CE + w1 GNLL                  (SegFormer, DepthFormer, SegDepthFormer)
    emuformer_loss  Eq. 11  L = CE + w1 GNLL + w2 KL + w3 RMSLE          (EMUFormer)

Why GNLL learns an aleatoric variance (Eq. 6). The depth head predicts a mean mu and a
variance s^2 per pixel and is scored by the negative log-likelihood of the ground truth
y under N(mu, s^2): 0.5 * ((y - mu)^2 / s^2 + log s^2). Nobody labels s^2; it is learned
because the two terms pull against each other. A large s^2 discounts the squared error
(useful where the depth is hard: edges, sky, far away), but log s^2 charges for it. For
a fixed error the minimum is at s^2 = (y - mu)^2, so s^2 becomes the network's estimate
of its own expected squared error: the data (aleatoric) uncertainty.

Why KL + RMSLE distil the teacher's uncertainty (Eqs. 8-10). A single network cannot see
its own epistemic uncertainty; a Deep Ensemble can, at ~30x the cost. EMUFormer trains a
single student to reproduce the ensemble's predictive uncertainty. For segmentation the
uncertainty lives in the whole softmax distribution (its entropy, Eq. 3), so the student's
softmax p is pulled towards the teacher's mean softmax q with KL(q || p) (Eq. 8). For depth
the uncertainty is one unbounded number per pixel, the teacher's predictive variance
sigma^2 (aleatoric mean + spread of the members' means, Eq. 10); there is no distribution
to match, so the student's s^2 regresses onto sigma^2 on a log(1 + x) scale (Eq. 9), which
compresses the huge range of variances and penalises under-estimates more than over-
estimates. The GNLL term stays: with the variance supervised by the teacher, it mostly
tells the mean where to trust the labels (Sec. 6.3: GNLL beats MSE and Huber).

Averaging conventions (one for all terms): every per-pixel loss is averaged over the
pixels that count in the whole batch, pooled (sum over pixels / number of pixels), as
mmseg does, not per image then over images. The pixels that count: CE, those with
label != IGNORE_INDEX; GNLL/MSE/Huber, those with a valid depth (data.valid_depth);
KL/RMSLE, all pixels or those of an optional mask. A batch with no pixel that counts
gives exactly 0 with a gradient graph (zero gradients), never 0/0 = NaN. Every loss is
computed in float32 and returns a 0-dim float32 tensor, whatever autocast is doing.

Several ranks (DDP). The batch is the global one, split over the ranks, and DDP averages
the ranks' gradients. With across_ranks=True each rank divides its pixel sum by the number
of pixels that count on all ranks (an all_reduce of the counts) and multiplies by the
number of ranks, so that the averaged gradient is the gradient of the global batch's mean,
however its pixels fall on the ranks (a rank mean each, averaged, would weigh a rank with
few valid pixels as much as one with many). The loss values of the ranks then differ;
their mean over ranks is the global batch's loss.

Weights: W1 = W3 = 1, W2 = 10, as the paper (Sec. 3.3, after Eq. 11; w1 = 1 for Eq. 7);
the scripts' --w1/--w2/--w3 default to these.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import IGNORE_INDEX, valid_depth

W1, W2, W3 = 1.0, 10.0, 1.0  # the paper's weights of GNLL, KL and RMSLE in Eqs. 7 and 11
MIN_VAR = 1e-4  # metres^2, the GNLL's variance floor (see gaussian_nll)


def _masked_mean(per_pixel, mask, across_ranks=False):
    """Mean of per_pixel (B, H, W) over the True pixels of mask, pooled over the batch, or over
    the global batch of all DDP ranks with across_ranks (see the module docstring).

    Clamping the count at 1 turns an empty mask into 0 / 1 = 0 (not NaN), and the
    product keeps the graph, so backward still runs and gives zero gradients.
    per_pixel must be finite everywhere (0 * NaN is NaN), callers make sure of that.
    """
    total, count = (per_pixel * mask).sum(), mask.sum()
    if across_ranks:
        dist.all_reduce(count)  # an integer count: no gradient, the same sum on every rank
        total = total * dist.get_world_size()
    return total / count.clamp_min(1)


def _all_if_none(mask, like):
    """mask (B, H, W) bool as given, or all True like `like` (B, H, W) when None."""
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask


# -----------------------------------------------------------------------------
# ground truth losses: Eq. 2 (segmentation), Eq. 6 and its ablations (depth)

def cross_entropy(seg_logits, label, across_ranks=False):
    """Cross-entropy of Eq. 2, averaged over all labelled pixels of the batch.

    seg_logits: (B, K, H, W) raw logits. label: (B, H, W) int64, 0..K-1 or IGNORE_INDEX.
    Eq. 2 averages per image; we pool the labelled pixels of the whole batch (as mmseg),
    so an image with more labelled pixels weighs more.
    """
    # reduction='none' gives 0 at ignored pixels; torch's 'mean' would be 0/0 on an all-ignored batch
    per_pixel = F.cross_entropy(seg_logits.float(), label, ignore_index=IGNORE_INDEX, reduction='none')
    return _masked_mean(per_pixel, label != IGNORE_INDEX, across_ranks)


def _depth_pixels(depth_mean, depth):
    """float32 mean, float32 target with invalid pixels set to 0, and the valid mask.

    Invalid targets may be NaN: they must be replaced, not just masked, because the
    backward pass of (y - mu)^2 at a masked pixel is 0 * NaN = NaN.
    """
    valid = valid_depth(depth)
    y = torch.where(valid, depth, 0.0).float()
    return depth_mean.float(), y, valid


def gaussian_nll(depth_mean, depth_var, depth, min_var=MIN_VAR, across_ranks=False):
    """Gaussian negative log-likelihood of Eq. 6, averaged over valid depth pixels.

    depth_mean: (B, H, W) mu in metres (after ReLU, Eq. 4). depth_var: (B, H, W) s^2 in
    metres^2 (after Softplus, Eq. 5). depth: (B, H, W) ground truth y in metres, valid iff
    data.valid_depth. Exactly Eq. 6, 0.5 * ((y - mu)^2 / s^2 + log s^2): without the constant
    0.5 * log(2 pi) of a true NLL (torch's GaussianNLLLoss also drops it), so it can be < 0.

    s^2 is floored at min_var, 1e-4 m^2 (a standard deviation of 1 cm, finer than the depth
    sensors of NYUv2 and Cityscapes measure). The floor bounds the gradients, e / s^2 for the
    mean and e^2 / (2 s^4) for the variance at an error e: with 1e-6 (1 mm) a pixel off by a
    metre gives 1e6 and 5e11, beyond fp16's 65504, so under fp16 GradScaler would skip every
    step while such pixels last; at 1e-4 a head with every pixel at the floor and metre errors
    still trains in fp16 (tests/test_losses.py). Like torch's GaussianNLLLoss the floor
    changes the value only; the gradient passes straight through, so a variance that fell
    below the floor still gets a gradient that can push it back up (a plain clamp would kill
    it for good).
    """
    mu, y, valid = _depth_pixels(depth_mean, depth)
    var = depth_var.float()
    var = var + (var.clamp_min(min_var) - var).detach()  # value floored, gradient straight through
    per_pixel = 0.5 * ((y - mu) ** 2 / var + torch.log(var))
    return _masked_mean(per_pixel, valid, across_ranks)


def mse(depth_mean, depth_var, depth, across_ranks=False):
    """Mean squared error (metres^2) over valid depth pixels; the MSE ablation of Tables 9/10.

    Same contract as gaussian_nll; depth_var is accepted (so the losses are interchangeable
    by name in DEPTH_LOSSES) and ignored: then only RMSLE (Eq. 11) trains the variance,
    and under Eq. 7 nothing does.
    """
    mu, y, valid = _depth_pixels(depth_mean, depth)
    return _masked_mean((y - mu) ** 2, valid, across_ranks)


def huber(depth_mean, depth_var, depth, delta=1.0, across_ranks=False):
    """Huber loss [25] over valid depth pixels; the Huber ablation of Tables 9/10.

    Per pixel 0.5 e^2 if |e| < delta else delta (|e| - 0.5 delta), with e = y - mu and
    delta in metres (the paper gives no delta; 1 m is torch's default). Same contract as
    gaussian_nll; depth_var is accepted and ignored, as in mse.
    """
    mu, y, valid = _depth_pixels(depth_mean, depth)
    return _masked_mean(F.huber_loss(mu, y, reduction='none', delta=delta), valid, across_ranks)


DEPTH_LOSSES = {'gnll': gaussian_nll, 'mse': mse, 'huber': huber}


def _depth_loss_fn(name):
    if name not in DEPTH_LOSSES:
        raise ValueError(f"unknown depth loss {name!r}, choose one of {sorted(DEPTH_LOSSES)}")
    return DEPTH_LOSSES[name]


# -----------------------------------------------------------------------------
# distillation losses: Eq. 8 (segmentation uncertainty), Eq. 9 (depth uncertainty)

def kl_divergence(teacher_log_probs, student_logits, mask=None, across_ranks=False):
    """KL(q || p) of Eq. 8, summed over classes, averaged over pixels.

    teacher_log_probs: (B, K, H, W) log q, the log of the teacher's mean softmax (Eq. 8).
    student_logits: (B, K, H, W) the student's raw logits z; p = softmax(z) (Eq. 1).
    mask: optional (B, H, W) bool, the pixels that count; None = all pixels (the teacher
    has a prediction everywhere, ignored labels included).

    All in log space: log p = log_softmax(z) never underflows, and q * (log q - log p) is
    taken as 0 where q = 0 (the limit of q log q), so an exact 0 in q (log q = -inf)
    gives no 0 * inf = NaN, neither forward nor backward.
    """
    log_q = teacher_log_probs.float()
    log_p = F.log_softmax(student_logits.float(), dim=1)
    q = log_q.exp()
    per_class = torch.where(q > 0, q * (log_q - log_p), 0.0)  # (B, K, H, W)
    per_pixel = per_class.sum(dim=1)  # (B, K, H, W) -> (B, H, W)
    return _masked_mean(per_pixel, _all_if_none(mask, per_pixel), across_ranks)


def rmsle(teacher_var, student_var, mask=None, across_ranks=False):
    """Root mean squared logarithmic error of Eq. 9 between two depth variances.

    teacher_var: (B, H, W) sigma^2, the teacher's predictive variance (Eq. 10), metres^2.
    student_var: (B, H, W) s^2, the student's variance (after Softplus, Eq. 5), metres^2.
    mask: optional (B, H, W) bool, the pixels that count; None = all pixels.
    sqrt(mean((log(sigma^2 + 1) - log(s^2 + 1))^2)), with log1p for accuracy at small x.
    """
    diff = torch.log1p(teacher_var.float()) - torch.log1p(student_var.float())
    mean_sq = _masked_mean(diff ** 2, _all_if_none(mask, diff), across_ranks)
    if across_ranks:
        # the root is of the global batch's mean: its value, the mean of the ranks' mean_sq,
        # with this rank's gradient, which DDP's average turns into the global one
        global_sq = mean_sq.detach().clone()
        dist.all_reduce(global_sq)
        mean_sq = global_sq / dist.get_world_size() + (mean_sq - mean_sq.detach())
    # d sqrt(x)/dx = 1 / (2 sqrt(x)) is inf at x = 0 (student == teacher, or no pixel counts),
    # and autograd multiplies it by d(diff^2) = 0: 0 * inf = NaN. So the root is taken only
    # of positive values (the inner where keeps sqrt(0) out of the graph), and at 0, the
    # minimum, the loss is exactly 0 with gradient 0. sqrt(x + eps) would also avoid the NaN
    # but is never exactly 0.
    positive = mean_sq > 0
    return torch.where(positive, torch.where(positive, mean_sq, 1.0).sqrt(), 0.0)


# -----------------------------------------------------------------------------
# the weighted sums that are trained: Eq. 7 and Eq. 11

def segdepth_loss(out, label, depth, w1=W1, depth_loss='gnll', across_ranks=False):
    """Eq. 7, L = CE + w1 * GNLL, for SegFormer, DepthFormer and SegDepthFormer.

    out: the model's dict; a term is used iff its keys are there ('seg_logits' -> CE,
    'depth_mean' and 'depth_var' -> depth loss), so SegFormer trains on CE alone and
    DepthFormer on the depth loss alone. label, depth: as cross_entropy, gaussian_nll.
    depth_loss: a name of DEPTH_LOSSES ('gnll' the paper's, 'mse'/'huber' Sec. 6.3).
    across_ranks: average over the global batch of all DDP ranks (module docstring).
    Returns (total, terms): total the weighted 0-dim sum to backward, terms the
    unweighted 0-dim terms by name ('ce', and 'gnll', 'mse' or 'huber') for logging.
    """
    depth_fn = _depth_loss_fn(depth_loss)  # checked first, so a typo fails even for a SegFormer
    terms, weights = {}, {}
    if 'seg_logits' in out:
        terms['ce'], weights['ce'] = cross_entropy(out['seg_logits'], label, across_ranks=across_ranks), 1.0
    if 'depth_mean' in out:
        terms[depth_loss] = depth_fn(out['depth_mean'], out['depth_var'], depth, across_ranks=across_ranks)
        weights[depth_loss] = w1
    total = sum(weights[name] * term for name, term in terms.items())
    return total, terms


def emuformer_loss(out, label, depth, teacher_log_probs, teacher_var,
                   w1=W1, w2=W2, w3=W3, depth_loss='gnll', mask=None, across_ranks=False):
    """Eq. 11, L = CE + w1 GNLL + w2 KL + w3 RMSLE, the student's objective.

    out, label, depth, w1, depth_loss, across_ranks: as segdepth_loss (Eq. 7 is the first
    two terms).
    teacher_log_probs: (B, K, H, W) log of the teacher's mean softmax q (Eq. 8).
    teacher_var: (B, H, W) teacher's predictive variance sigma^2 (Eq. 10), metres^2.
    mask: optional (B, H, W) bool, the pixels the two distillation terms average over;
    None = all pixels. Defaults w1 = w3 = 1, w2 = 10 as the paper.
    As in Eq. 7 a term is used iff the student has its output: KL needs 'seg_logits',
    RMSLE 'depth_var'. Returns (total, terms); terms adds 'kl' and 'rmsle'.
    """
    total, terms = segdepth_loss(out, label, depth, w1, depth_loss, across_ranks)
    if 'seg_logits' in out:
        terms['kl'] = kl_divergence(teacher_log_probs, out['seg_logits'], mask, across_ranks)
        total = total + w2 * terms['kl']
    if 'depth_var' in out:
        terms['rmsle'] = rmsle(teacher_var, out['depth_var'], mask, across_ranks)
        total = total + w3 * terms['rmsle']
    return total, terms
