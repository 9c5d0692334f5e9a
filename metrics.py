"""
The metrics that judge a prediction and its uncertainty (Landgraf et al., Section 4,
"Metrics"), for joint semantic segmentation and monocular depth estimation: first the paper's,
then the rankings a reviewer of uncertainty asks for. uq.py makes the predictions; the loop
that feeds them here is evaluate.py's.

The paper's columns of Tables 2-7 (all but the inference time) come from two classes:

    SegMetrics    mIoU (and per-class IoU, pixel accuracy), ECE [Naeini et al.] and the
                  uncertainty quality of the softmax (mean over samples) and its entropy
    DepthMetrics  RMSE (and AbsRel, delta1/2/3), and the uncertainty quality of the
                  predictive variance, with a pixel "accurate" iff delta < 1.25 (Eq. 13)

Uncertainty quality follows Mukhoti & Gal as the paper applies it: in each image a pixel is
"certain" iff its uncertainty is at most that image's mean uncertainty, and counting
accurate/inaccurate x certain/uncertain pixels over the data set gives
p(accurate|certain), p(uncertain|inaccurate) and PAvPU. The same classes also give the
scoring rules (NLL, Brier), the coverage of the depth intervals and the means of the two kinds
of uncertainty (Section 2.2).

These are exact sums: update() only adds to sufficient statistics (a confusion matrix, per-bin
counts and sums, four uncertainty counts, float64 sums), so the result does not depend on batch
size, batch order or the number of DDP ranks (up to float64 round-off in the sums).

Then, below, the metrics that rank pixels by their uncertainty:

    failure detection      AUROC, AUPR of the misclassified pixels by entropy (SegMetrics)
    selective prediction   AURC, AUGRC, accepting the most certain pixels first, and the
                           risk at 80% coverage and the coverage at 5% risk (SegMetrics)
    sparsification         AUSE, AURG of RMSE, AbsRel and a1 per image (Poggi et al.;
                           DepthMetrics), exact: each image's pixels are sorted
    out-of-distribution    AUROC, AUPR, FPR95 of the pixels of unseen objects (OODMetrics)

Failure detection, selective prediction and OOD detection are histogram-bounded, not exact:
each streams a histogram of SCORE_BINS bins of the score and treats a bin as a group of ties,
and reports next to every value its '_bound', the largest error that any order of the pixels
inside the bins could make (section comment below). evaluate.py prints the bounds.

The plain definitions every metric here is tested against, a Python loop where the loop is the
definition, are in tests/brute_force.py (tests/test_metrics.py compares them).

    seg, dep = SegMetrics(num_classes, device=device), DepthMetrics(device=device)
    for image, label, depth in loader:
        pred = uq.predict(model, image, method)
        seg.update(pred.probs, label, pred.entropy)
        dep.update(pred.depth_mean, pred.depth_var, depth)
    seg.reduce(); dep.reduce()  # sum the statistics over ranks (a no-op without DDP)
    print(seg.compute(), dep.compute())
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from data import IGNORE_INDEX, valid_depth

# ---- The paper's metrics, from sums ----

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
      accepting the most certain first: aurc, augrc, and the operating points risk_at_80 and
      coverage_at_5 (_risk_coverage); from a histogram of the uncertainty over
      [0, log K] (section 'Ranking by uncertainty, histogram-bounded' below), each with its
      '_bound'.
    - entropy_mean, aleatoric_mean, mutual_information_mean: the means of the uncertainty and of
      the two parts of Section 2.2 (NaN where they were not given).
    compute() -> {'pixels', 'miou', 'iou' (list of K), 'pixel_acc', 'ece', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu', 'nll', 'brier', 'auroc_failure', 'aupr_failure', 'aurc',
    'augrc', 'risk_at_80', 'coverage_at_5' (and their '_bound's), 'entropy_mean',
    'aleatoric_mean', 'mutual_information_mean', 'rss' (the function rss)}, Python floats, NaN
    where nothing was counted.
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
        out = {
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
        out['rss'] = rss(out)
        return out


def rss(seg):
    """The summary score RSS (arXiv 2506.05917, the paper's authors): the harmonic mean of mIoU,
    1 - ECE, p(accurate|certain) and p(uncertain|inaccurate), of SegMetrics.compute()'s numbers,
    so it is high only where all four are; 0 if one is 0, NaN if one is NaN."""
    parts = [seg['miou'], 1 - seg['ece'], seg['p_accurate_certain'], seg['p_uncertain_inaccurate']]
    if any(math.isnan(p) for p in parts):
        return math.nan
    return 0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)


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
    - interval_coverage, interval_width: with interval_scale q (calibrate.py's split-conformal
      scale), the fraction with |y - mu| <= q s and the mean width 2 q s of those intervals, in
      metres (NaN without q).
    compute() -> {'pixels', 'rmse', 'abs_rel', 'delta1', 'delta2', 'delta3', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu', 'nll', 'variance_mean', 'coverage_1sigma', 'coverage_2sigma', 'ause_rmse',
    'ause_absrel', 'ause_a1', 'aurg_rmse', 'aurg_absrel', 'aurg_a1', 'aleatoric_var_mean',
    'epistemic_var_mean', 'interval_coverage', 'interval_width'}, Python floats, NaN where nothing
    was counted; sparsification_curves() the mean curves over images.
    """

    DELTA_THRESHOLDS = (1.25, 1.25 ** 2, 1.25 ** 3)

    def __init__(self, device='cpu', interval_scale=None):
        super().__init__(
            device,
            n=((), torch.int64),  # number of valid pixels
            interval=((2,), torch.float64),  # pixels inside mu +- q s, the sum of the widths 2 q s
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
        self.interval_scale = interval_scale

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
        if self.interval_scale is not None:
            half = self.interval_scale * var.sqrt()  # q s, metres, of the floored variance as the NLL
            self._add('interval', torch.stack([(error <= half).sum().double(), 2 * half.sum()]))
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
        inside, widths = self.stats['interval'].tolist()
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
            'interval_coverage': _ratio(inside, n) if self.interval_scale is not None else math.nan,
            'interval_width': _ratio(widths, n) if self.interval_scale is not None else math.nan,
        }


# ---- Ranking by uncertainty, histogram-bounded ----
#
# Failure detection (are the misclassified pixels the uncertain ones?), selective prediction
# (how fast does the risk fall as the most uncertain pixels are left out?) and
# out-of-distribution detection (OODMetrics, below) rank hundreds of millions of pixels by a score. Sorting them
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


# the operating points of selective prediction: the risk at this coverage, the coverage at this risk
RISK_AT_COVERAGE, COVERAGE_AT_RISK = 0.8, 0.05


def _risk_coverage(errors, correct):
    """AURC and AUGRC over groups of tied (errors, correct) counts, most certain first, accepted
    in that order (Geifman & El-Yaniv; Traub et al. 2024, as fd-shifts computes them):
    the selective risk (errors / accepted) and the generalized risk (errors / all) after each
    group, integrated over coverage by the trapezoid rule, from (0, the first risk) for AURC
    and from (0, 0) for AUGRC. On the same curve, straight between its points as the trapezoid
    rule has it, two operating points: risk_at_80, the selective risk at 80% coverage, and
    coverage_at_5, the largest coverage whose selective risk is at most 5% (0 if none is)."""
    n = errors.sum() + correct.sum()
    keep = (errors + correct) > 0  # an empty bin adds no point
    accepted, wrong = np.cumsum(errors + correct)[keep], np.cumsum(errors)[keep]
    if not n:
        return dict.fromkeys(('aurc', 'augrc', 'risk_at_80', 'coverage_at_5'), math.nan)
    coverage = np.concatenate([[0.0], accepted / n])
    selective = np.concatenate([wrong[:1] / accepted[:1], wrong / accepted])
    generalized = np.concatenate([[0.0], wrong / n])
    trapezoid = lambda y: ((coverage[1:] - coverage[:-1]) * (y[1:] + y[:-1]) / 2).sum()
    return {'aurc': trapezoid(selective), 'augrc': trapezoid(generalized),
            'risk_at_80': np.interp(RISK_AT_COVERAGE, coverage, selective),
            'coverage_at_5': _last_crossing(coverage, selective, COVERAGE_AT_RISK)}


def _last_crossing(x, y, level):
    """The largest x on the polyline through (x_k, y_k) where y <= level; 0 if nowhere."""
    below = np.nonzero(y <= level)[0]
    if not len(below):
        return 0.0
    k = below[-1]
    if k == len(y) - 1:
        return float(x[k])
    return float(x[k] + (level - y[k]) * (x[k + 1] - x[k]) / (y[k + 1] - y[k]))  # y_k <= level < y_k+1


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
    {'auroc', 'aupr', 'fpr95'} and their '_bound's (section comment above)."""
    neg, pos = histogram.cpu().numpy()
    return _bound(_detection, pos, neg)


def risk_coverage_metrics(histogram):
    """histogram (2, SCORE_BINS) counts of [correct, errors] by uncertainty bin ->
    {'aurc', 'augrc', 'risk_at_80', 'coverage_at_5'} and their '_bound's. Accepting the most
    certain first is the same ranking as detecting errors by the highest uncertainty, read from
    the other end."""
    correct, errors = histogram.cpu().numpy()
    # _groups orders highest first: hand it the bins reversed, so the most certain come first
    return _bound(lambda e, c: _risk_coverage(e, c), errors[::-1], correct[::-1])


# ---- Ranking by uncertainty, exact per image: sparsification (Poggi et al., CVPR 2020) ----

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


# ---- Ranking by uncertainty: out-of-distribution pixels, histogram-bounded ----

class OODMetrics:
    """Out-of-distribution detection, pixel by pixel: how well each uncertainty separates the
    pixels of objects of no training class (sample['ood']) from the in-distribution pixels of
    the same images. Over images of both (not OOD images alone, where every pixel is a positive
    and AUROC means nothing). The scores, each larger = more likely OOD:
        entropy              the entropy of the mean softmax (Eq. 3), on [0, log K]
        mutual_information   its epistemic part (Section 2.2), on [0, log K]
        depth_var            the predictive variance (Eq. 10), on a log scale over [1e-6, 1e6] m^2
    each streamed as a histogram of SCORE_BINS bins of [in-distribution, OOD] counts (histogram-bounded,
    see the section comment 'Ranking by uncertainty, histogram-bounded': each metric comes with
    its '_bound'), summed over DDP ranks by reduce().
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
