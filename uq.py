"""
Uncertainty quantification for joint semantic segmentation and monocular depth estimation,
and the metrics that judge it (Landgraf et al., Sections 2.2, 3.2-3.3 and 4).

A single network gives one prediction and, at best, its aleatoric uncertainty: the entropy of
its softmax (Eq. 3) and the variance its depth head learned through the GNLL loss (Eq. 5, 6).
What it cannot see is its own epistemic uncertainty, how much the prediction would change had
the network been trained differently. The three methods of the paper estimate it by drawing
several predictions ("samples") and looking at how they disagree:

    MC Dropout (mcd)            one network; dropout stays on at test time (rate 0.2 or 0.5) and
                                T = 10 forward passes see T different thinned networks
                                (Gal & Ghahramani; mc_dropout switches every dropout layer on)
    Deep Sub-Ensemble (dse)     one shared encoder with N = 10 decoder heads per task, trained
                                one head per batch (Valdenegro-Toro); the encoder runs once and
                                the heads as grouped computations (heads.DeepSubEnsemble)
    Deep Ensemble (de)          N = 10 whole networks trained from different random inits and
                                data orders (Lakshminarayanan et al.); the state of the art, at
                                N times the cost (DeepEnsemble: a loop on a CPU, one vmapped
                                model over the stacked weights on a GPU)
    none                        the single network as it is: its own entropy and variance

Every method yields samples, one output dict at a time (on a GPU they are computed several at
once, but still summarised one by one), and a Summary accumulates them into the same
`Prediction` (paper Section 4, "Predictions" and "Uncertainty"):

    segmentation   mean softmax   q = 1/S sum_t softmax(z_t)
                   prediction     argmax_c q_c
                   uncertainty    entropy H(q) = -sum_c q_c log q_c       (Eq. 3)
    depth          mean           mu_bar = 1/S sum_t mu_t, with mu_t = ReLU(.) already (Eq. 4)
                   uncertainty    sigma^2 = 1/S sum_t s_t^2 + 1/S sum_t (mu_t - mu_bar)^2   (Eq. 10)

Eq. 10 is the law of total variance for an equal mixture of the S Gaussians N(mu_t, s_t^2):
the first term is the aleatoric part (the mean of the variances each sample predicts), the
second the epistemic part (how much the samples' means disagree); with S = 1 it is the head's
own variance. Section 2.2 splits the segmentation uncertainty the same way: the total H(q) is
the mean of the samples' own entropies (aleatoric) plus the mutual information between the
prediction and the sample (epistemic); predict(..., decompose=True) keeps all four parts.
Accumulating sample by sample keeps one sample at full resolution in memory at a time, never
S (bench.py's peak column). The same Prediction of a Deep Ensemble is the teacher's target for
EMUFormer (log q for Eq. 8, sigma^2 for Eq. 9).

    teacher = DeepEnsemble(members)                 # stacks the weights once on a GPU
    pred = predict(teacher, images, 'de')
    pred = predict(model, images, 'mcd', samples=10, dropout=0.2)
    pred.probs, pred.pred, pred.entropy, pred.depth_mean, pred.depth_var

Metrics
-------
The quality columns of the paper's result tables (all but inference time) come from two classes:

    SegMetrics    mIoU (and per-class IoU, pixel accuracy), ECE [Naeini et al.] and the
                  uncertainty quality of the softmax (mean over samples) and its entropy
    DepthMetrics  RMSE (and AbsRel, delta1/2/3), and the uncertainty quality of the
                  predictive variance, with a pixel "accurate" iff delta < 1.25 (Eq. 13)

Uncertainty quality follows Mukhoti & Gal as the paper applies it: in each image a pixel is
"certain" iff its uncertainty is at most that image's mean uncertainty, and counting
accurate/inaccurate x certain/uncertain pixels over the data set gives
p(accurate|certain), p(uncertain|inaccurate) and PAvPU.

The metrics are streaming and exact: update() only adds to sufficient statistics (a
confusion matrix, per-bin counts and sums, four uncertainty counts, float64 sums), so the
result does not depend on batch size, batch order or the number of DDP ranks. Evaluation:

    seg, dep = SegMetrics(num_classes, device=device), DepthMetrics(device=device)
    for image, label, depth in loader:
        pred = predict(model, image, method)
        seg.update(pred.probs, label, pred.entropy)
        dep.update(pred.depth_mean, pred.depth_var, depth)
    seg.reduce(); dep.reduce()  # sum the statistics over ranks (a no-op without DDP)
    print(seg.compute(), dep.compute())
"""

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

import plumbing
from data import IGNORE_INDEX, valid_depth
from heads import DeepSubEnsemble, full_size

# ---- Uncertainty methods ----

METHODS = ('none', 'mcd', 'dse', 'de')


@contextmanager
def mc_dropout(model, p):
    """Monte Carlo Dropout (Gal & Ghahramani): inside this block every dropout layer of `model`
    samples a fresh mask at rate p, even in eval mode; BatchNorm keeps its running statistics
    and stochastic depth stays off, so the only randomness is dropout's. Rates and modes are
    restored on exit.

        model.eval()
        with mc_dropout(model, 0.2):
            samples = [model(x) for _ in range(10)]
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    saved = [(m.p, m.training) for m in layers]
    for m in layers:
        m.p = p
        m.train()
    try:
        yield model
    finally:
        for m, (rate, training) in zip(layers, saved):
            m.p = rate
            m.train(training)


@dataclass
class Prediction:
    """Mean prediction and predictive uncertainty of a batch; None for a task the model lacks
    (and for the decomposition unless it was asked for).

    probs               (B, K, H, W)  the mean softmax q
    entropy             (B, H, W)     H(q), nats (Eq. 3): the total uncertainty
    depth_mean          (B, H, W)     mean depth, metres
    depth_var           (B, H, W)     predictive variance, metres^2 (Eq. 10)
    decompose=True adds Section 2.2's two kinds of uncertainty:
    aleatoric_entropy   (B, H, W)     the mean of the samples' entropies (data uncertainty)
    mutual_information  (B, H, W)     entropy - aleatoric_entropy (model uncertainty)
    aleatoric_var       (B, H, W)     Eq. 10's first term, the mean of the variances
    epistemic_var       (B, H, W)     its second, the spread of the means
    """
    probs: torch.Tensor = None
    entropy: torch.Tensor = None
    depth_mean: torch.Tensor = None
    depth_var: torch.Tensor = None
    aleatoric_entropy: torch.Tensor = None
    mutual_information: torch.Tensor = None
    aleatoric_var: torch.Tensor = None
    epistemic_var: torch.Tensor = None

    @property
    def log_probs(self):
        return self.probs.log()  # log q for Eq. 8; -inf where q = 0, which losses.kl_divergence handles

    @property
    def pred(self):
        return self.probs.max(dim=1).indices  # (B, K, H, W) -> (B, H, W) class ids, ties to the lowest


def softmax(z):
    """Softmax over the classes of (B, K, H, W) logits, in float32, along the dimension that is
    contiguous in memory: the classes for channels_last logits (the models' fast upsampling
    makes them so), where a reduction over dim 1 would stride through memory."""
    z = z.float()
    if z.is_contiguous(memory_format=torch.channels_last):
        return F.softmax(z.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
    return F.softmax(z, dim=1)


def entropy(p):
    """-sum_c p_c log p_c over dim 1 of (B, K, H, W) probabilities, with 0 log 0 = 0 (the
    clamp turns log 0 = -inf into a finite number that 0 multiplies to 0). The sum over classes
    is one batched dot product per pixel."""
    log_p = p.log().clamp_min_(torch.finfo(p.dtype).min)
    return -torch.einsum('bkhw,bkhw->bhw', p, log_p)


class Summary:
    """Eq. 3 and Eq. 10 accumulated over samples, one at a time, so that an S-sample prediction
    never holds more than one sample at full resolution: the sum of the softmaxes (and of their
    entropies, with decompose), and for depth the running mean and summed squared deviations of
    the means (Welford's update, exact where E[mu^2] - E[mu]^2 would cancel) and the sum of the
    variances. add(out) takes one sample's output dict at the input size, (B, ...)."""

    def __init__(self, decompose=False):
        self.decompose, self.n = decompose, 0
        self.probs = self.entropies = self.mean = self.squares = self.variances = None

    def add(self, out):
        self.n += 1
        if 'seg_logits' in out:
            p = softmax(out['seg_logits'])
            self.probs = p if self.probs is None else self.probs.add_(p)
            if self.decompose:
                h = entropy(p)
                self.entropies = h if self.entropies is None else self.entropies.add_(h)
        if 'depth_mean' in out:
            mu, var = out['depth_mean'].float(), out['depth_var'].float()
            if self.mean is None:
                self.mean, self.squares, self.variances = mu.clone(), torch.zeros_like(mu), var.clone()
            else:
                delta = mu - self.mean
                self.mean.add_(delta / self.n)
                self.squares.addcmul_(delta, mu - self.mean)
                self.variances.add_(var)

    def prediction(self):
        pred = Prediction()
        if self.probs is not None:
            pred.probs = self.probs.div_(self.n)
            # Eq. 3; of one sample it is that sample's entropy, already summed when decomposing
            pred.entropy = self.entropies if self.decompose and self.n == 1 else entropy(pred.probs)
            if self.decompose:
                pred.aleatoric_entropy = self.entropies / self.n
                pred.mutual_information = pred.entropy - pred.aleatoric_entropy
        if self.mean is not None:
            pred.depth_mean = self.mean
            aleatoric, epistemic = self.variances / self.n, self.squares / self.n  # 1/S, not 1/(S-1)
            pred.depth_var = aleatoric + epistemic  # Eq. 10
            if self.decompose:
                pred.aleatoric_var, pred.epistemic_var = aleatoric, epistemic
        return pred


def summarize(samples, decompose=False):
    """Samples (the model's output dict with a leading sample dimension S) -> Prediction."""
    summary = Summary(decompose)
    for t in range(next(iter(samples.values())).shape[0]):
        summary.add({k: v[t] for k, v in samples.items()})
    return summary.prediction()


class DeepEnsemble:
    """N trained members of one architecture, run as one model.

    batched=True stacks the members' weights once, (N, ...) per tensor, and runs the network
    once with torch.func.vmap over that stack: every layer processes all members in one call
    (a conv becomes a grouped conv, a matmul a batched matmul), which keeps a GPU busy where a
    loop of N small passes would not. A CPU has no idle units to fill, and there the loop is
    faster; bench.py times both (README: on an H100, B2, N=10, bf16, batch 1, the batched pass
    took 0.34x the loop's time; on 2 CPU threads in fp32 about 2.2x): batched=None, the default,
    batches on a GPU and loops on a CPU. outputs(images) yields the members' output dicts one at a time (the batched pass
    stops at the heads' 1/4-resolution outputs, which are small, and brings one member at a
    time to full size); self(images) stacks them, (N, B, ...). Members are used in eval mode
    and without gradients (the ensemble is a fixed teacher or evaluator).
    """

    def __init__(self, members, batched=None):
        self.members = [m.eval() for m in members]
        self.batched = all_at_once(next(members[0].parameters()).device) if batched is None else batched
        if self.batched:
            params, self.buffers = stack_module_state(self.members)
            self.params = {k: v.detach() for k, v in params.items()}
            # a weightless copy of the architecture; functional_call supplies the stacked tensors
            self.base = copy.deepcopy(self.members[0]).to('meta')

    def __len__(self):
        return len(self.members)

    @torch.no_grad()
    def outputs(self, images):
        if not self.batched:
            for m in self.members:
                yield m(images)
            return
        member = lambda params, buffers, x: functional_call(self.base, (params, buffers), (x,), {'full': False})
        with warnings.catch_warnings():
            # PyTorch has no vmap rule for the CPU flash-attention kernel and loops over the
            # members for that one op; the result is the same, so the warning is only noise
            warnings.filterwarnings('ignore', message='There is a performance drop')
            low = vmap(member, in_dims=(0, 0, None))(self.params, self.buffers, images)  # {task: (N, B, ...)}
        for n in range(len(self)):
            yield full_size({task: z[n] for task, z in low.items()}, images.shape[-2:])

    def __call__(self, images):
        outs = list(self.outputs(images))
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


def all_at_once(device):
    """Whether the samples of a prediction (MC Dropout passes, DSE heads, Deep Ensemble members)
    run all at once on `device`: on a GPU, which wants large batches, yes; on a CPU, which runs
    no faster in larger batches and would hold them all in memory, one at a time."""
    return torch.device(device).type == 'cuda'


def default_chunk(images, total):
    """How many samples one call computes (all_at_once)."""
    return total if all_at_once(images.device) else 1


def mc_dropout_outputs(model, images, samples=10, dropout=0.2, chunk=None):
    """T = `samples` passes with every dropout layer on at rate `dropout`, yielded one output
    dict (B, ...) at a time; `chunk` passes run as one batch of chunk * B images, each replica
    with its own masks."""
    chunk = chunk or default_chunk(images, samples)
    B = images.shape[0]
    with mc_dropout(model, dropout):
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            out = model(images.repeat(n, 1, 1, 1))  # (n*B, ...): replica t of image b at t*B + b
            for t in range(n):
                yield {k: v[t * B:(t + 1) * B] for k, v in out.items()}


def dse_outputs(model, images, chunk=None):
    """A Deep Sub-Ensemble's heads on one pass of its encoder, `chunk` members' decoders as one
    grouped computation, yielded one member's output dict (B, ...) at a time."""
    chunk = chunk or default_chunk(images, model.num_members)
    features = model.backbone(images)
    for start in range(0, model.num_members, chunk):
        for low in model.run_members(features, range(start, min(start + chunk, model.num_members))):
            yield full_size(low, images.shape[-2:])


def mc_dropout_samples(model, images, samples=10, dropout=0.2, chunk=None):
    """The MC Dropout samples stacked: (T, B, ...) per output (for tests and inspection)."""
    with torch.no_grad():
        outs = list(mc_dropout_outputs(model, images, samples, dropout, chunk))
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


@torch.no_grad()
def predict(model, images, method='none', samples=10, dropout=0.2, chunk=None, decompose=False):
    """The single entry point: a model and an image batch (B, 3, H, W) -> Prediction.

    method  'none'  model is a SegFormer/DepthFormer/SegDepthFormer; one pass
            'mcd'   the same kind of model; `samples` passes at dropout rate `dropout`
            'dse'   model is a heads.DeepSubEnsemble; all heads
            'de'    model is a DeepEnsemble (or a list of members, stacked on every call)
    chunk: MC Dropout passes or DSE members computed per call (default_chunk). decompose:
    also the aleatoric and epistemic parts (Prediction). The samples are summarised as they come
    (Summary), never all held at full resolution. The model is put in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown uncertainty method {method!r}: expected one of {', '.join(METHODS)}")
    if method != 'de' and (method == 'dse') != isinstance(model, DeepSubEnsemble):
        raise ValueError(f"method {method!r} does not fit a {type(model).__name__}: "
                         "a DeepSubEnsemble is evaluated with method 'dse' and only it")
    if method == 'de':
        outputs = (model if isinstance(model, DeepEnsemble) else DeepEnsemble(model)).outputs(images)
    elif method == 'mcd':
        outputs = mc_dropout_outputs(model.eval(), images, samples, dropout, chunk)
    elif method == 'dse':
        outputs = dse_outputs(model.eval(), images, chunk)
    else:
        outputs = [model.eval()(images)]
    summary = Summary(decompose)
    for out in outputs:
        summary.add(out)
    return summary.prediction()


# ---- Metrics: ranking by uncertainty, from histograms ----
#
# Failure detection (are the misclassified pixels the uncertain ones?), selective prediction
# (how fast does the risk fall as the most uncertain pixels are left out?) and, in evaluate.py,
# out-of-distribution detection rank hundreds of millions of pixels by a score. Sorting them
# all is out of the question, so each is streamed as a fine histogram: the count of positives
# and negatives in each of SCORE_BINS equal-width bins of the score. The metrics are computed
# with each bin a group of tied scores, which is exact where the scores in a bin are equal and
# otherwise off by at most what ordering the positives and negatives inside each bin could
# change: every metric comes with that bound, from the same histogram (`_bound`), the largest
# distance to the values with every bin's positives first and with its negatives first. Scores
# outside the histogram's range join its first or last bin, and the bound covers them too.

SCORE_BINS = 2 ** 16


def score_bins(score, low, high, log=False):
    """The histogram bin (0 .. SCORE_BINS - 1) of each score in [low, high], on a log scale with
    log=True (for variances, which span orders of magnitude); clamped at both ends."""
    s = score.double()
    if log:
        s, low, high = s.clamp_min(1e-300).log(), math.log(low), math.log(high)
    return ((s - low) * (SCORE_BINS / (high - low))).floor().clamp(0, SCORE_BINS - 1).long()


def _groups(pos, neg, order):
    """The bins, highest score first, as groups of tied (pos, neg) counts; order 'tied' keeps
    each bin one group, 'positives first' and 'negatives first' split it in two."""
    pos, neg = pos[::-1].astype(np.float64), neg[::-1].astype(np.float64)
    if order == 'tied':
        return pos, neg
    zero = np.zeros_like(pos)
    first, second = ((pos, zero), (zero, neg)) if order == 'positives first' else ((zero, neg), (pos, zero))
    return np.stack([first[0], second[0]], 1).ravel(), np.stack([first[1], second[1]], 1).ravel()


def _detection(pos, neg):
    """AUROC, AUPR and FPR95 of "flag iff score >= t" over groups of tied (pos, neg) counts,
    highest score first (tests/brute_force.py writes out the same definitions):
        AUROC  sum_g neg_g (tp_before_g + pos_g / 2) / (P N): ties count one half
        AUPR   sum_g (pos_g / P) * tp_g / (tp_g + fp_g): average precision, no interpolation
        FPR95  fp / N at the first group (the highest threshold) where tp / P >= 0.95"""
    P, N = pos.sum(), neg.sum()
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    auroc = (neg * (tp - pos + pos / 2)).sum() / (P * N) if P and N else math.nan
    flagged = pos > 0
    aupr = (pos[flagged] / P * tp[flagged] / (tp[flagged] + fp[flagged])).sum() if P else math.nan
    fpr95 = fp[np.argmax(tp / P >= 0.95)] / N if P and N else math.nan
    return {'auroc': auroc, 'aupr': aupr, 'fpr95': fpr95}


def _risk_coverage(errors, correct):
    """AURC and AUGRC over groups of tied (errors, correct) counts, most certain first, accepted
    in that order (Geifman & El-Yaniv; Traub et al. 2024, as fd-shifts computes them):
    the selective risk (errors / accepted) and the generalized risk (errors / all) after each
    group, integrated over coverage by the trapezoid rule, from (0, the first risk) for AURC
    and from (0, 0) for AUGRC."""
    n = errors.sum() + correct.sum()
    keep = (errors + correct) > 0  # an empty bin adds no point
    accepted, wrong = np.cumsum(errors + correct)[keep], np.cumsum(errors)[keep]
    if not n:
        return {'aurc': math.nan, 'augrc': math.nan}
    coverage = np.concatenate([[0.0], accepted / n])
    selective, generalized = wrong / accepted, wrong / n
    trapezoid = lambda y: ((coverage[1:] - coverage[:-1]) * (y[1:] + y[:-1]) / 2).sum()
    return {'aurc': trapezoid(np.concatenate([selective[:1], selective])),
            'augrc': trapezoid(np.concatenate([[0.0], generalized]))}


def _bound(metric, pos, neg):
    """metric's values with every bin a group of ties, and the largest distance from them to
    the values with each bin's positives first or its negatives first: -> {name: value,
    name_bound: bound}."""
    tied = metric(*_groups(pos, neg, 'tied'))
    extremes = [metric(*_groups(pos, neg, order)) for order in ('positives first', 'negatives first')]
    out = {}
    for name, value in tied.items():
        out[name] = float(value)
        out[f'{name}_bound'] = float(max(abs(e[name] - value) for e in extremes))
    return out


def detection_metrics(histogram):
    """histogram (2, SCORE_BINS) counts of [negatives, positives] by score bin ->
    {'auroc', 'aupr', 'fpr95'} and their '_bound's (module comment above)."""
    neg, pos = histogram.cpu().numpy()
    return _bound(_detection, pos, neg)


def risk_coverage_metrics(histogram):
    """histogram (2, SCORE_BINS) counts of [correct, errors] by uncertainty bin ->
    {'aurc', 'augrc'} and their '_bound's. Accepting the most certain first is the same
    ranking as detecting errors by the highest uncertainty, read from the other end."""
    correct, errors = histogram.cpu().numpy()
    # _groups orders highest first: hand it the bins reversed, so the most certain come first
    return _bound(lambda e, c: _risk_coverage(e, c), errors[::-1], correct[::-1])


# ---- Metrics: sparsification (Poggi et al., CVPR 2020) ----

SPARSIFICATION = ('rmse', 'absrel', 'a1')
# mono-uncertainty's compute_aucs, written as it writes them so that the floats are the same:
# percentiles 100/50 t of the pixels removed, t = 0..49, and the curves' abscissae t/50, t = 0..50
POGGI_PERCENTILES = [100.0 / 50 * t for t in range(50)]
POGGI_X = [1.0 / 50 * t for t in range(51)]


def _numpy_percentile(ascending, percentiles):
    """np.percentile(x, q) (its default 'linear' method) of the values `ascending` (sorted,
    float64), computed with numpy's own formulas in numpy's order, so that the same pixels fall
    on each side of it: the index (n - 1) q / 100 and the lerp that counts from the nearer end."""
    n = len(ascending)
    q = torch.tensor(percentiles, dtype=torch.float64, device=ascending.device) / 100
    index = (n - 1) * q
    below = index.floor()
    gamma = index - below
    a = ascending[below.long().clamp(0, n - 1)]
    b = ascending[(below.long() + 1).clamp(0, n - 1)]
    return torch.where(gamma >= 0.5, b - (b - a) * (1 - gamma), a + (b - a) * gamma)


def _sparsification_curves(key, per_pixel, metrics=SPARSIFICATION):
    """The curve of each of `metrics` over the pixels left after removing the 0, 2, .., 98% with
    the largest `key`, as compute_aucs removes them: keep -key >= np.percentile(-key, q), so a
    pixel tied with the cut is kept. per_pixel: (squared error, absolute relative error,
    outlier) of each pixel; the means over every kept set come from suffix sums in the order of
    -key, which is sorted once for all the metrics. -> {metric: curve}"""
    negated, order = torch.sort(-key, stable=True)
    first_kept = torch.searchsorted(negated, _numpy_percentile(negated, POGGI_PERCENTILES))
    kept = len(key) - first_kept
    curves = {}
    for m in metrics:
        value = per_pixel[SPARSIFICATION.index(m)][order].flip(0).cumsum(0).flip(0)[first_kept] / kept
        curves[m] = torch.cat([value.sqrt() if m == 'rmse' else value, value.new_zeros(1)])  # 0 at x = 1
    return curves


def sparsification(pred, gt, uncertainty):
    """One image's sparsification, AUSE and AURG (Poggi et al., CVPR 2020; mono-uncertainty's
    compute_aucs): for RMSE, AbsRel and a1 (as the fraction of outliers, 1 - a1, so that lower
    is better), the metric of the pixels left after removing the 0, 2, .., 98% most uncertain
    (and 0 at 100%); the oracle curve removes them by their own error instead (the squared
    error, the relative error, the ratio max(mu/y, y/mu)); the "random" curve is the metric of
    the whole image at every fraction. AUSE = area(curve) - area(oracle), AURG = area(random) -
    area(curve), by the trapezoid rule on the 51 points. pred, gt, uncertainty: (n,) the image's
    valid pixels, float64; pred is clipped at 1 mm first, as Poggi's evaluation does (a
    prediction of 0 has an infinite ratio, which the percentiles cannot order).
    -> {metric: {'ause', 'aurg', 'curve', 'oracle', 'random'}}."""
    pred = pred.clamp_min(1e-3)
    ratio = torch.maximum(pred / gt, gt / pred)
    per_pixel = ((gt - pred) ** 2, (gt - pred).abs() / gt, (ratio >= 1.25).double())
    oracle_keys = {'rmse': per_pixel[0], 'absrel': per_pixel[1], 'a1': ratio}
    x = torch.tensor(POGGI_X, dtype=torch.float64, device=pred.device)
    area = lambda y: ((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum()
    out = {}
    curves = _sparsification_curves(uncertainty, per_pixel)
    for m in SPARSIFICATION:
        curve = curves[m]
        oracle = _sparsification_curves(oracle_keys[m], per_pixel, [m])[m]
        random = curve[0].expand(51)  # the whole image's metric: nothing removed
        out[m] = {'ause': area(curve) - area(oracle), 'aurg': random[0] - area(curve),
                  'curve': curve, 'oracle': oracle, 'random': random}
    return out


# ---- Metrics ----

def _ratio(numerator, denominator):
    # An empty denominator (nothing to measure) gives NaN: no number is invented.
    return numerator / denominator if denominator else float('nan')


class StreamingMetric:
    """Sufficient statistics that are only ever added to, shared by both tasks.

    `stats` maps a name to a tensor on `device`: int64 for counts, float64 for sums.
    update() adds one batch, reduce() all-reduces (SUM) every statistic across DDP ranks,
    compute() turns the totals into numbers. Sums are order-independent (exactly for counts,
    up to float64 round-off for sums), so any split of the data gives the same result.
    Call reduce() once, after the last update and before compute().

    Both tasks share the uncertainty counts of Mukhoti & Gal, held as
    stats['uncertainty_counts'] = [n_ac, n_au, n_ic, n_iu] (accurate/inaccurate x
    certain/uncertain), from which
        p(accurate|certain)     = n_ac / (n_ac + n_ic)
        p(uncertain|inaccurate) = n_iu / (n_ic + n_iu)
        PAvPU                   = (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu)
    each NaN when its denominator is 0.
    """

    def __init__(self, device, **stats):
        # stats: name -> (shape, dtype) of each task-specific statistic
        stats['uncertainty_counts'] = ((4,), torch.int64)
        self.device = device
        self.stats = {name: torch.zeros(shape, dtype=dtype, device=device)
                      for name, (shape, dtype) in stats.items()}

    def _add(self, name, value):
        # the batch is reduced where the inputs live; only the small result moves to `device`
        self.stats[name] += value.to(self.device)

    def _count_uncertainty(self, accurate, uncertainty, counted):
        """Add one batch to [n_ac, n_au, n_ic, n_iu].

        accurate, counted: (B, H, W) bool; uncertainty: (B, H, W) float, any unit.
        The threshold is each image's mean uncertainty over its counted pixels (Section 4:
        "the mean uncertainty of a given image"), in float64; a pixel is certain iff
        uncertainty <= threshold. An image without counted pixels adds nothing.
        """
        u = uncertainty.double()
        # where, not a product: uncounted pixels may hold anything, inf included
        threshold = torch.where(counted, u, 0.0).sum((1, 2)) / counted.sum((1, 2))  # (B,)
        uncertain = u > threshold[:, None, None]  # (B, H, W)
        # table cell 2 * inaccurate + uncertain orders the counts n_ac, n_au, n_ic, n_iu
        cell = 2 * (~accurate[counted]).long() + uncertain[counted].long()  # (n,)
        self._add('uncertainty_counts', torch.bincount(cell, minlength=4))

    def _uncertainty_metrics(self):
        n_ac, n_au, n_ic, n_iu = self.stats['uncertainty_counts'].tolist()
        return {
            'p_accurate_certain': _ratio(n_ac, n_ac + n_ic),
            'p_uncertain_inaccurate': _ratio(n_iu, n_ic + n_iu),
            'pavpu': _ratio(n_ac + n_iu, n_ac + n_au + n_ic + n_iu),
        }

    def reduce(self):
        if dist.is_available() and dist.is_initialized():
            for total in self.stats.values():
                dist.all_reduce(total, op=dist.ReduceOp.SUM)


class SegMetrics(StreamingMetric):
    """Semantic segmentation: the paper's mIoU, ECE and uncertainty quality, and the scoring
    rules, failure detection and uncertainty decomposition a reviewer asks for.

    Only labelled pixels (label != 255) count. q are the probabilities (the mean softmax), the
    prediction their argmax, the confidence their max (ties go to the lowest class index).
    - IoU_c = TP / (TP + FP + FN) from the confusion matrix; a class with TP + FP + FN = 0
      (absent from prediction and ground truth) gets NaN and is left out of the mean (mIoU).
      pixel_acc = sum TP / number of labelled pixels.
    - ECE (Naeini et al.) with M equal-width bins, bin m holding confidences in
      ((m-1)/M, m/M] (a confidence of exactly 0 joins the first bin):
      ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| = sum_m |correct_m - sum conf_m| / n.
    - Uncertainty quality (see StreamingMetric) with accurate iff prediction == label,
      the threshold being the mean uncertainty over each image's labelled pixels.
    - nll = mean of -log q_y (q_y below float32's smallest normal, 1.2e-38, counts as that: one
      q_y = 0 would make the mean infinite); brier = mean of sum_c (q_c - [y = c])^2, in [0, 2].
    - Failure detection with the uncertainty (the entropy) as the score of being misclassified:
      auroc_failure, aupr_failure (misclassified the positive class), and selective prediction
      accepting the most certain first: aurc, augrc; from a histogram of the uncertainty over
      [0, log K] (module comment above), each with its '_bound'.
    - entropy_mean, aleatoric_mean, mutual_information_mean: the means of the uncertainty and of
      the two parts of Section 2.2 (NaN where they were not given).
    compute() -> {'pixels', 'miou', 'iou' (list of K), 'pixel_acc', 'ece', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu', 'nll', 'brier', 'auroc_failure', 'aupr_failure', 'aurc',
    'augrc' (and their '_bound's), 'entropy_mean', 'aleatoric_mean', 'mutual_information_mean'},
    Python floats, NaN where nothing was counted.
    """

    def __init__(self, num_classes, num_bins=15, device='cpu'):
        K, M = num_classes, num_bins
        super().__init__(
            device,
            confusion=((K, K), torch.int64),  # rows: ground truth, columns: prediction
            bin_count=((M,), torch.int64),
            bin_correct=((M,), torch.int64),
            bin_confidence=((M,), torch.float64),  # sum of the confidences in each bin
            failure=((2, SCORE_BINS), torch.int64),  # [correct, misclassified] by uncertainty bin
            sums=((5,), torch.float64),  # nll, brier, uncertainty, aleatoric, mutual information
            decomposed=((), torch.int64),  # labelled pixels that came with the two parts
        )
        self.num_classes, self.num_bins = K, M

    def update(self, probs, label, uncertainty, aleatoric=None, mutual_information=None):
        """probs: (B, K, H, W) softmax (mean over samples for MCD and ensembles); label:
        (B, H, W) int64 in [0, K) or 255; uncertainty: (B, H, W), the entropy; aleatoric,
        mutual_information: (B, H, W), its two parts (Prediction), or None."""
        K, M = self.num_classes, self.num_bins
        confidence, pred = probs.max(dim=1)  # (B, K, H, W) -> (B, H, W) twice
        labelled = label != IGNORE_INDEX
        correct = pred == label
        self._count_uncertainty(correct, uncertainty, labelled)

        y, pred, correct = label[labelled], pred[labelled], correct[labelled]  # (n,)
        self._add('confusion', torch.bincount(y * K + pred, minlength=K * K).view(K, K))

        # float64 makes conf * M exact for a float32 confidence, so the bin edges are exact;
        # ceil(conf * M) - 1 puts conf in ((m-1)/M, m/M] into 0-based bin m-1
        conf = confidence[labelled].double()
        m = (torch.ceil(conf * M).long() - 1).clamp(min=0)  # conf = 0 -> first bin
        self._add('bin_count', torch.bincount(m, minlength=M))
        self._add('bin_correct', torch.bincount(m[correct], minlength=M))
        self._add('bin_confidence', torch.bincount(m, weights=conf, minlength=M))

        u = uncertainty[labelled]
        cell = (~correct).long() * SCORE_BINS + score_bins(u, 0.0, math.log(K) if K > 1 else 1.0)  # H <= log K
        self._add('failure', torch.bincount(cell, minlength=2 * SCORE_BINS).view(2, SCORE_BINS))
        q_y = probs.gather(1, label.clamp(max=K - 1)[:, None]).squeeze(1)[labelled].double()  # (n,)
        q_squared = (probs.movedim(1, -1)[labelled].double() ** 2).sum(1)  # sum_c q_c^2, in float64
        parts = [(a[labelled].double().sum() if a is not None else torch.zeros((), dtype=torch.float64,
                                                                               device=u.device))
                 for a in (aleatoric, mutual_information)]
        self._add('sums', torch.stack([-q_y.clamp_min(torch.finfo(torch.float32).tiny).log().sum(),
                                       (q_squared - 2 * q_y + 1).sum(), u.double().sum(), *parts]))
        if aleatoric is not None:
            self._add('decomposed', labelled.sum())

    def compute(self):
        cm = self.stats['confusion'].double()
        tp = cm.diag()
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)  # TP / (TP + FP + FN); 0/0 = NaN: excluded
        n = self.stats['bin_count'].sum().item()
        gap = (self.stats['bin_correct'] - self.stats['bin_confidence']).abs().sum().item()
        nll, brier, uncertainty, aleatoric, mutual = self.stats['sums'].tolist()
        decomposed = self.stats['decomposed'].item()
        failure = detection_metrics(self.stats['failure'])
        return {
            'pixels': n,
            'miou': iou.nanmean().item(),
            'iou': iou.tolist(),
            'pixel_acc': _ratio(tp.sum().item(), n),
            'ece': _ratio(gap, n),
            **self._uncertainty_metrics(),
            'nll': _ratio(nll, n),
            'brier': _ratio(brier, n),
            'auroc_failure': failure['auroc'], 'auroc_failure_bound': failure['auroc_bound'],
            'aupr_failure': failure['aupr'], 'aupr_failure_bound': failure['aupr_bound'],
            **risk_coverage_metrics(self.stats['failure']),
            'entropy_mean': _ratio(uncertainty, n),
            'aleatoric_mean': _ratio(aleatoric, decomposed),
            'mutual_information_mean': _ratio(mutual, decomposed),
        }


class DepthMetrics(StreamingMetric):
    """Monocular depth: the paper's RMSE, AbsRel, delta1/2/3 and uncertainty quality, and the
    likelihood, sparsification, calibration and decomposition of the predictive variance.

    Only valid pixels count: ground truth y > 0 and finite. The pixel metrics pool the valid
    pixels of the whole data set (not a mean of per-image values), in float64:
    RMSE = sqrt(sum (mu - y)^2 / n), AbsRel = sum |mu - y| / y / n, and delta_i = fraction
    of pixels with delta = max(mu/y, y/mu) < 1.25^i (Eq. 13); a prediction mu = 0 has
    delta = inf, so it is inaccurate. Uncertainty quality (see StreamingMetric) calls a
    pixel accurate iff delta < 1.25, the threshold being the mean variance over each image's
    valid pixels. With the predictive variance s^2:
    - nll: the Gaussian negative log-likelihood of y under N(mu, s^2), the mean of
      0.5 log(2 pi s^2) + (y - mu)^2 / (2 s^2): the constant 0.5 log(2 pi) included (torch's
      loss and Eq. 6 drop it), s^2 below float32's smallest normal counted as that.
    - coverage_1sigma, coverage_2sigma: the fraction with |y - mu| <= s and <= 2 s (0.683 and
      0.954 for a calibrated Gaussian).
    - ause_*, aurg_* (rmse, absrel, a1): sparsification as Poggi et al. compute it, per image
      (sparsification), then averaged over the images that have valid pixels.
    - aleatoric_var_mean, epistemic_var_mean: the means of Eq. 10's two terms (NaN where they
      were not given).
    - variance_mean: the mean predictive variance, the depth's total uncertainty.
    compute() -> {'pixels', 'rmse', 'abs_rel', 'delta1', 'delta2', 'delta3', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu', 'nll', 'variance_mean', 'coverage_1sigma', 'coverage_2sigma', 'ause_rmse',
    'ause_absrel', 'ause_a1', 'aurg_rmse', 'aurg_absrel', 'aurg_a1', 'aleatoric_var_mean',
    'epistemic_var_mean'}, Python floats, NaN where nothing was counted; sparsification_curves()
    the mean curves over images.
    """

    DELTA_THRESHOLDS = (1.25, 1.25 ** 2, 1.25 ** 3)

    def __init__(self, device='cpu'):
        super().__init__(
            device,
            n=((), torch.int64),  # number of valid pixels
            squared_error=((), torch.float64),
            abs_rel=((), torch.float64),
            delta_counts=((3,), torch.int64),
            sums=((4,), torch.float64),  # nll, variance, aleatoric, epistemic
            coverage=((2,), torch.int64),  # within 1 and 2 standard deviations
            decomposed=((), torch.int64),  # valid pixels that came with the two terms
            images=((), torch.int64),  # images with valid pixels: the sparsification's mean
            sparsification=((3, 2), torch.float64),  # (rmse, absrel, a1) x (ause, aurg), summed
            curves=((3, 3, 51), torch.float64),  # (rmse, absrel, a1) x (curve, oracle, random), summed
        )

    def update(self, mean, variance, depth, aleatoric=None, epistemic=None):
        """mean: (B, H, W) predicted depth mu in metres (>= 0); variance: (B, H, W) the
        predictive variance s^2 (m^2); depth: (B, H, W) ground truth y in metres (valid iff
        data.valid_depth); aleatoric, epistemic: (B, H, W) the two terms of Eq. 10, or None."""
        valid = valid_depth(depth)
        mu, y = mean.double(), depth.double()
        delta = torch.maximum(mu / y, y / mu)  # (B, H, W), Eq. 13; garbage where not valid
        self._count_uncertainty(delta < 1.25, variance, valid)
        for b in range(len(depth)):  # sparsification is per image
            if valid[b].any():
                self._add_sparsification(sparsification(mu[b][valid[b]], y[b][valid[b]], variance[b][valid[b]].double()))

        var = variance[valid].double().clamp_min(torch.finfo(torch.float32).tiny)
        mu, y, delta = mu[valid], y[valid], delta[valid]  # (n,)
        self._add('n', valid.sum())
        self._add('squared_error', ((mu - y) ** 2).sum())
        self._add('abs_rel', ((mu - y).abs() / y).sum())
        self._add('delta_counts', torch.stack([(delta < t).sum() for t in self.DELTA_THRESHOLDS]))
        error = (y - mu).abs()
        self._add('coverage', torch.stack([(error <= k * var.sqrt()).sum() for k in (1, 2)]))
        parts = [(a[valid].double().sum() if a is not None else torch.zeros((), dtype=torch.float64,
                                                                           device=y.device))
                 for a in (aleatoric, epistemic)]
        nll = (0.5 * torch.log(2 * math.pi * var) + (y - mu) ** 2 / (2 * var)).sum()
        self._add('sums', torch.stack([nll, variance[valid].double().sum(), *parts]))
        if aleatoric is not None:
            self._add('decomposed', valid.sum())

    def _add_sparsification(self, image):
        self._add('images', torch.ones((), dtype=torch.int64, device=self.device))
        self._add('sparsification', torch.stack([torch.stack([image[m]['ause'], image[m]['aurg']])
                                                 for m in SPARSIFICATION]))
        self._add('curves', torch.stack([torch.stack([image[m][c] for c in ('curve', 'oracle', 'random')])
                                         for m in SPARSIFICATION]))

    def sparsification_curves(self):
        """The mean over images of each metric's sparsification, oracle and random curves:
        {metric: {'x', 'curve', 'oracle', 'random'}} (lists of 51 floats), for a plot."""
        mean = self.stats['curves'] / max(self.stats['images'].item(), 1)
        return {m: {'x': POGGI_X, **{c: mean[i, j].tolist() for j, c in enumerate(('curve', 'oracle', 'random'))}}
                for i, m in enumerate(SPARSIFICATION)}

    def compute(self):
        n, images = self.stats['n'].item(), self.stats['images'].item()
        d1, d2, d3 = self.stats['delta_counts'].tolist()
        nll, var, aleatoric, epistemic = self.stats['sums'].tolist()
        c1, c2 = self.stats['coverage'].tolist()
        decomposed = self.stats['decomposed'].item()
        sparse = self.stats['sparsification'].tolist()
        return {
            'pixels': n,
            'rmse': math.sqrt(_ratio(self.stats['squared_error'].item(), n)),
            'abs_rel': _ratio(self.stats['abs_rel'].item(), n),
            'delta1': _ratio(d1, n),
            'delta2': _ratio(d2, n),
            'delta3': _ratio(d3, n),
            **self._uncertainty_metrics(),
            'nll': _ratio(nll, n),
            'variance_mean': _ratio(var, n),
            'coverage_1sigma': _ratio(c1, n),
            'coverage_2sigma': _ratio(c2, n),
            **{f'ause_{m}': _ratio(sparse[i][0], images) for i, m in enumerate(SPARSIFICATION)},
            **{f'aurg_{m}': _ratio(sparse[i][1], images) for i, m in enumerate(SPARSIFICATION)},
            'aleatoric_var_mean': _ratio(aleatoric, decomposed),
            'epistemic_var_mean': _ratio(epistemic, decomposed),
        }


class OODMetrics:
    """Out-of-distribution detection, pixel by pixel: how well each uncertainty separates the
    pixels of objects of no training class (sample['ood']) from the in-distribution pixels of
    the same images. Over images of both (not OOD images alone, where every pixel is a positive
    and AUROC means nothing). The scores, each larger = more likely OOD:
        entropy              the entropy of the mean softmax (Eq. 3), on [0, log K]
        mutual_information   its epistemic part (Section 2.2), on [0, log K]
        depth_var            the predictive variance (Eq. 10), on a log scale over [1e-6, 1e6] m^2
    each streamed as a histogram of 2^16 bins of [in-distribution, OOD] counts (module comment
    above: the metrics exact within their '_bound'), summed over DDP ranks by reduce().
    compute() -> {score: {'auroc', 'aupr', 'fpr95' (the FPR at the highest threshold with a TPR
    of 95%), their '_bound's, 'ood_pixels', 'pixels'} or None where no prediction had the score}."""

    def __init__(self, num_classes, device='cpu'):
        top = math.log(num_classes) if num_classes > 1 else 1.0
        self.ranges = {'entropy': (0.0, top, False), 'mutual_information': (0.0, top, False),
                       'depth_var': (1e-6, 1e6, True)}
        self.device = device
        self.histograms = {k: torch.zeros(2, SCORE_BINS, dtype=torch.int64, device=device) for k in self.ranges}
        self.seen = set()

    def update(self, scores, ood):
        """scores: {name: (B, H, W) or None (the model lacks it)}; ood: (B, H, W) bool."""
        for name, score in scores.items():
            if score is None:
                continue
            low, high, log = self.ranges[name]
            cell = ood.long().flatten() * SCORE_BINS + score_bins(score.flatten(), low, high, log)
            self.histograms[name] += torch.bincount(cell, minlength=2 * SCORE_BINS).view(2, SCORE_BINS).to(self.device)
            self.seen.add(name)

    def reduce(self):
        if dist.is_available() and dist.is_initialized():
            for h in self.histograms.values():
                dist.all_reduce(h, op=dist.ReduceOp.SUM)

    def compute(self):
        return {name: dict(detection_metrics(h), ood_pixels=int(h[1].sum()), pixels=int(h.sum()))
                if name in self.seen else None for name, h in self.histograms.items()}


# ---- Evaluation over a data set ----

@torch.no_grad()
def evaluate(model, loader, num_classes, method='none', device='cpu', amp_dtype=None, on_batch=None,
             **method_kwargs):
    """Run `predict` over a loader of sample dicts and stream the metrics.

    amp_dtype: the autocast dtype of the forward passes (plumbing.autocast_dtype), None for fp32.
    on_batch(batch, pred, seconds): called after each batch (visualisation, logging), with the
    wall-clock seconds of predict() (the device synchronised, so GPU time is included).
    Returns {'seg': SegMetrics.compute() or None, 'depth': ... or None, 'ood': OODMetrics.compute()
    where the samples carry an 'ood' mask, else None, 'times': [seconds],
    'seg_metrics', 'depth_metrics': the metric objects themselves (their statistics draw the
    reliability diagram and the sparsification plot)}, with the statistics summed over DDP
    ranks first.
    """
    seg, dep, ood = SegMetrics(num_classes, device=device), DepthMetrics(device=device), OODMetrics(num_classes, device)
    has = set()
    times = []
    for batch in loader:
        images = batch['image'].to(device, non_blocking=True)
        plumbing.sync(device)
        start = time.perf_counter()
        with plumbing.autocast(torch.device(device), amp_dtype):
            pred = predict(model, images, method, **method_kwargs)
        plumbing.sync(device)
        times.append(time.perf_counter() - start)
        if pred.probs is not None:
            seg.update(pred.probs, batch['label'].to(device), pred.entropy, pred.aleatoric_entropy,
                       pred.mutual_information)
            has.add('seg')
        if pred.depth_mean is not None:
            dep.update(pred.depth_mean, pred.depth_var, batch['depth'].to(device), pred.aleatoric_var,
                       pred.epistemic_var)
            has.add('depth')
        if 'ood' in batch:  # a single network has no mutual information (it is 0 everywhere)
            ood.update({'entropy': pred.entropy, 'depth_var': pred.depth_var,
                        'mutual_information': pred.mutual_information if method != 'none' else None},
                       batch['ood'].to(device))
            has.add('ood')
        if on_batch:
            on_batch(batch, pred, times[-1])
    seg.reduce()
    dep.reduce()
    ood.reduce()
    return {'seg': seg.compute() if 'seg' in has else None,
            'depth': dep.compute() if 'depth' in has else None,
            'ood': ood.compute() if 'ood' in has else None,
            'times': times, 'seg_metrics': seg, 'depth_metrics': dep}


def nothing_counted(metrics):
    """Notes on the tasks of an evaluation whose metrics had no pixel to count (NaN; null in
    JSON): said out loud, so that a NaN is never read as a result."""
    notes = []
    if metrics['seg'] is not None and metrics['seg']['pixels'] == 0:
        notes.append('segmentation: no labelled pixel (every label is IGNORE_INDEX), its metrics are NaN')
    if metrics['depth'] is not None and metrics['depth']['pixels'] == 0:
        notes.append('depth: no valid ground-truth depth (data.valid_depth), its metrics are NaN')
    return notes
