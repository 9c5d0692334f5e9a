"""
Brute-force references for the uncertainty metrics, each one its published definition written
plainly (numpy float64, a Python loop where the loop is the definition) for the streaming
implementations to be tested against. Nothing here is fast and nothing in the package imports
it; tests do (`import brute_force` from a file in tests/).

Every input is a 1-d array over the pixels that count (the caller drops ignore labels and
invalid depths first) unless said otherwise; every metric returns a Python float.

    segmentation  nll, brier                  probs (n, K) rows summing to 1, labels (n,) ints
                  auroc, auroc_loop, aupr,    scores (n,) floats, larger = more likely positive;
                  fpr_at_95_tpr               positives (n,) bool
                  aurc, augrc,                uncertainty (n,) floats, errors (n,) bool
                  risk_at_coverage,
                  coverage_at_risk
    depth         sparsification, ause_aurg   ONE image: pred, gt (metres), uncertainty (n,)
                  gaussian_nll, coverage      mu, sigma2 (a variance, m^2), y (n,)

Ties decide the ranking metrics on real data (an entropy or a variance saved in half precision
repeats thousands of times in a data set), so every ranking function says how it treats them.
The rule everywhere: samples with equal scores are never ordered among themselves, they enter
or leave together, at one threshold.

The public code each function matches (read for this file, at the commits named; none of it
is copied):
    scikit-learn 1.9.1       sklearn/metrics/_ranking.py: roc_curve, roc_auc_score,
                             precision_recall_curve, average_precision_score
    IML-DKFZ/fd-shifts @c4467ae
                             fd_shifts/analysis/rc_stats.py (RiskCoverageStatsMixin.evaluate_auc),
                             rc_stats_utils.py (selective_risk_stats, generalized_risk_stats),
                             metrics.py (StatsCache.rc_curve_stats, the legacy AURC)
    ENSTA-U2IS-AI/torch-uncertainty @0d0df2b
                             src/torch_uncertainty/metrics/classification/risk_coverage.py (AURC,
                             AUGRC), .../classification/fpr.py (FPRx), metrics/sparsification.py
    Jingkang50/OpenOOD @3c35632              openood/evaluators/metrics.py (auc_and_fpr_recall)
    hendrycks/outlier-exposure @5653113      utils/display_results.py (fpr_and_fdr_at_recall)
    mattpoggi/mono-uncertainty @543772b      evaluate.py (compute_eigen_errors_v2, compute_aucs,
                                             evaluate)

Self-check against scikit-learn and scipy where they are importable (neither is needed by the
package; install them in a throwaway venv):

    python tests/brute_force.py
"""

import math

import numpy as np


# ---- segmentation: proper scoring rules ----

def nll(probs, labels):
    """Negative log-likelihood of the labels, the mean over pixels of -log probs[i, labels[i]].

    probs (n, K) rows summing to 1, labels (n,) ints in [0, K). A zero probability on the
    true class gives inf (no clipping; scikit-learn's log_loss clips to [eps, 1 - eps]).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    p_true = probs[np.arange(n), labels]  # (n, K) -> (n,): the probability of the true class
    return float(np.mean(-np.log(p_true)))


def brier(probs, labels):
    """Multi-class Brier score (Brier, 1950): the mean over pixels of
    sum_c (probs[i, c] - [labels[i] == c])^2, in [0, 2].

    The sum over classes is not divided by K nor halved: scikit-learn's brier_score_loss with
    scale_by_half=False, and torch-uncertainty's BrierScore (top_class=False).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    n, num_classes = probs.shape
    one_hot = np.zeros((n, num_classes))
    one_hot[np.arange(n), labels] = 1.0
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


# ---- ranking: the counts at every threshold ----

def threshold_counts(scores, positives):
    """The detector "flag a sample iff score >= t" at every distinct score t, highest first.

    Returns (thresholds, tp, fp), float64 arrays of length m = the number of distinct scores:
    tp[k] and fp[k] count the positives and negatives with score >= thresholds[k]. A group of
    tied scores is flagged all at once, at its own threshold, so the order of tied samples
    never matters. The last entry flags everything (tp[-1] = P, fp[-1] = N). This is
    scikit-learn's _binary_clf_curve / confusion_matrix_at_thresholds before roc_curve or
    precision_recall_curve drop points from it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    assert np.all(np.isfinite(scores)), 'scores must be finite'
    order = np.argsort(-scores, kind='stable')  # highest score first
    thresholds, tp, fp = [], [], []
    n_tp, n_fp, i, n = 0, 0, 0, len(scores)
    while i < n:
        t = scores[order[i]]
        while i < n and scores[order[i]] == t:  # the whole tie group enters together
            if positives[order[i]]:
                n_tp += 1
            else:
                n_fp += 1
            i += 1
        thresholds.append(t)
        tp.append(n_tp)
        fp.append(n_fp)
    return np.array(thresholds), np.array(tp, dtype=np.float64), np.array(fp, dtype=np.float64)


def threshold_counts_loop(scores, positives):
    """threshold_counts by its definition: for each distinct score t (highest first), count
    the flagged samples with a mask. O(n * m); for a few thousand samples at most."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    thresholds = np.unique(scores)[::-1]
    tp = np.array([np.sum((scores >= t) & positives) for t in thresholds], dtype=np.float64)
    fp = np.array([np.sum((scores >= t) & ~positives) for t in thresholds], dtype=np.float64)
    return thresholds, tp, fp


def auroc_loop(scores, positives):
    """Area under the ROC curve as the Mann-Whitney statistic, the pure double loop:

        AUROC = 1 / (P N) * sum_{i positive} sum_{j negative} ([s_i > s_j] + 1/2 [s_i == s_j])

    the probability that a random positive scores above a random negative, ties counted one
    half. O(P N): for at most a few hundred samples.
    """
    pos = [float(s) for s, p in zip(scores, positives) if p]
    neg = [float(s) for s, p in zip(scores, positives) if not p]
    wins = 0.0
    for s_pos in pos:
        for s_neg in neg:
            if s_pos > s_neg:
                wins += 1.0
            elif s_pos == s_neg:
                wins += 0.5
    return wins / (len(pos) * len(neg))


def auroc(scores, positives):
    """Area under the ROC curve with `positives` the positive class and a larger score more
    likely positive; the same number as auroc_loop, counted per tie group:

        AUROC = 1 / (P N) * sum_g  fp_g * (tp_before_g + tp_g / 2)

    over the groups g of tied scores from the highest down, where fp_g and tp_g count the
    negatives and positives in g and tp_before_g the positives scored above g: each negative
    of g loses to every positive above it and ties (one half) with the positives of g. This
    is also the trapezoid area under the ROC points (fp_k / N, tp_k / P) of
    threshold_counts starting from (0, 0), which is how scikit-learn's roc_auc_score
    computes it (roc_curve, then auc), so the two agree exactly on ties.
    ZeroDivisionError without both classes.
    """
    _, tp, fp = threshold_counts(scores, positives)
    n_pos, n_neg = float(tp[-1]), float(fp[-1])
    u = 0.0
    tp_before, fp_before = 0.0, 0.0
    for tp_k, fp_k in zip(tp.tolist(), fp.tolist()):
        tp_g, fp_g = tp_k - tp_before, fp_k - fp_before  # the positives and negatives in g
        u += fp_g * (tp_before + 0.5 * tp_g)
        tp_before, fp_before = tp_k, fp_k
    return u / (n_pos * n_neg)


def aupr(scores, positives):
    """Average precision as scikit-learn's average_precision_score: the step-function area
    under the precision-recall curve, without interpolation,

        AP = sum_k (R_k - R_{k-1}) P_k,   R_0 = 0,

    over the distinct scores t_k from the highest down (a tie group is one threshold), with
    P_k = tp_k / (tp_k + fp_k) and R_k = tp_k / P the precision and recall of "score >= t_k"
    (threshold_counts). Thresholds that add no positive add nothing. NaN without positives
    (scikit-learn warns and returns 0 there; it never happens in our tests).
    """
    _, tp, fp = threshold_counts(scores, positives)
    n_pos = float(tp[-1])
    if n_pos == 0:
        return float('nan')
    ap, recall_before = 0.0, 0.0
    for tp_k, fp_k in zip(tp.tolist(), fp.tolist()):
        recall, precision = tp_k / n_pos, tp_k / (tp_k + fp_k)
        ap += (recall - recall_before) * precision
        recall_before = recall
    return ap


def fpr_at_95_tpr(scores, positives, tpr_level=0.95):
    """False positive rate of "flag iff score >= t" at the HIGHEST threshold t (among the
    distinct scores) whose true positive rate TPR(t) = tp / P is at least tpr_level:

        FPR95 = FPR(t*),  t* = max {t : TPR(t) >= 0.95},  FPR(t) = fp / N.

    As TPR and FPR both fall as t rises, this is also the lowest FPR over all thresholds with
    TPR >= 0.95 ("the FPR when 95% of the positives are caught"); lowering t further (the
    "smallest" threshold) only adds false positives. Tied scores are flagged together, so
    TPR(t*) may overshoot 0.95 by a whole tie group; nothing is interpolated. TPR is compared
    as the quotient tp / P >= 0.95, as scikit-learn computes it.

    This is `fpr[np.argmax(tpr >= 0.95)]` on scikit-learn's roc_curve(...,
    drop_intermediate=False) (drop_intermediate=True, the default that OpenOOD's
    auc_and_fpr_recall uses, can skip t* when a tie group of the same make-up follows it).
    The rule of Hendrycks et al. (outlier-exposure, fpr_and_fdr_at_recall) and of
    torch-uncertainty's FPRx (translated from it) differs twice: it takes the TPR value
    CLOSEST to 0.95, which may be below it, and of the thresholds sharing that TPR the
    LOWEST one, with the most false positives. 19 positives scored above 3 negatives above 1
    positive above 2 negatives: here FPR95 = 0 (TPR = 19/20 before any negative), there
    3/5.
    """
    _, tp, fp = threshold_counts(scores, positives)
    n_pos, n_neg = float(tp[-1]), float(fp[-1])
    for tp_k, fp_k in zip(tp.tolist(), fp.tolist()):  # thresholds from the highest down
        if tp_k / n_pos >= tpr_level:
            return fp_k / n_neg
    raise AssertionError('unreachable: the last threshold flags every positive')


# ---- selective prediction: risk-coverage curves ----

def risk_coverage_points(uncertainty, errors):
    """The points of the risk-coverage curve at every distinct uncertainty value.

    Samples are accepted in order of increasing uncertainty, a group of tied values all at
    once. After each group, i.e. for every distinct value t with accepted = {u <= t}:

        coverage          = |accepted| / n
        selective risk    = errors among the accepted / |accepted|     (Geifman & El-Yaniv)
        generalized risk  = errors among the accepted / n              (Traub et al.)

    Returns three float64 arrays of length m = the number of distinct values, coverage
    ascending, the last point coverage 1. These are the points of fd-shifts'
    selective_risk_stats / generalized_risk_stats (rc_stats_utils.py) with confidence =
    -uncertainty, which emit a point only where the sorted confidence changes; the order
    within a tie group never matters.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    errors = np.asarray(errors, dtype=bool)
    assert np.all(np.isfinite(uncertainty)), 'uncertainty must be finite'
    n = len(uncertainty)
    order = np.argsort(uncertainty, kind='stable')  # most certain first
    coverage, selective, generalized = [], [], []
    n_accepted, n_errors, i = 0, 0, 0
    while i < n:
        t = uncertainty[order[i]]
        while i < n and uncertainty[order[i]] == t:  # accept the whole tie group
            n_accepted += 1
            n_errors += int(errors[order[i]])
            i += 1
        coverage.append(n_accepted / n)
        selective.append(n_errors / n_accepted)
        generalized.append(n_errors / n)
    return np.array(coverage), np.array(selective), np.array(generalized)


def _trapezoid(y, x):
    """sum_k (x_k - x_{k-1}) (y_k + y_{k-1}) / 2, the trapezoid rule written out (np.trapz
    and np.trapezoid compute the same sum)."""
    area = 0.0
    for k in range(1, len(x)):
        area += (float(x[k]) - float(x[k - 1])) * (float(y[k]) + float(y[k - 1])) / 2.0
    return area


def aurc(uncertainty, errors):
    """Area under the risk-coverage curve (Geifman & El-Yaniv, NeurIPS 2017), exactly as
    fd-shifts computes it today (RiskCoverageStats(confids=-uncertainty, residuals=errors)
    .aurc, Traub et al. 2024; fd_shifts/analysis/rc_stats.py, evaluate_auc with its default
    linear interpolation):

    - the points of risk_coverage_points with the selective risk, one per distinct
      uncertainty value (coverage 1 down to the coverage of the most certain tie group),
    - one more point at coverage 0 with the risk of the last one (a flat extension: the
      selective risk of an empty set is undefined),
    - the trapezoid rule over coverage, which is exactly linear interpolation between points.

    Returned as a fraction; fd-shifts reports it times 1000 (AUC_DISPLAY_SCALE). With all
    samples distinct this is (1/n) * sum_{k=1..n} (r_{k-1} + r_k) / 2 with r_k the risk of the
    k most certain samples and r_0 = r_1.

    Not the same number as: torch-uncertainty's AURC (risk_coverage.py), which sorts samples
    one by one (ties in arbitrary sort order, not grouped), starts its trapezoid at coverage
    1/n without the point at 0 and divides the area by (1 - 1/n); nor fd-shifts' AURC before
    June 2024 (commit cf58528, that of Jaeger et al., ICLR 2023; kept as legacy=True in
    metrics.py StatsCache.rc_curve_stats), which, removing the least confident first, puts a
    point after the FIRST sample of each tie group has gone rather than after the whole
    group, and with distinct values has no point at coverage 0.
    """
    coverage, selective, _ = risk_coverage_points(uncertainty, errors)
    x = np.concatenate([[0.0], coverage])
    y = np.concatenate([[selective[0]], selective])
    return _trapezoid(y, x)


def augrc(uncertainty, errors):
    """Area under the generalized risk-coverage curve (Traub et al., "Overcoming common flaws
    in the evaluation of selective classification systems", NeurIPS 2024), exactly as
    fd-shifts computes it (RiskCoverageStats(confids=-uncertainty, residuals=errors).augrc;
    rc_stats.py evaluate_auc, rc_stats_utils.py generalized_risk_stats):

    - the points of risk_coverage_points with the generalized risk
      errors-among-the-accepted / n, one per distinct uncertainty value,
    - one more point (0, 0): nothing accepted, no undetected error,
    - the trapezoid rule over coverage (not a mean over samples).

    Returned as a fraction; fd-shifts reports it times 1000. Each error i counts in the
    generalized risk for the coverage during which it is accepted; the trapezoid across a tie
    group accepts each of its samples for half the group's width, so that length is
    (#{j : u_j > u_i} + #{j : u_j = u_i} / 2) / n and, summing over the errors,

        AUGRC = (1 - AUROC) * acc * (1 - acc) + (1 - acc)^2 / 2

    exactly, ties included, with acc the accuracy and AUROC = auroc(uncertainty, errors)
    (errors the positives, ties one half): the relation Traub et al. give between AUGRC and
    the failure-detection AUROC. The self-check tests it against scikit-learn.

    torch-uncertainty's AUGRC differs as its AURC does (per-sample points in sort order,
    trapezoid from coverage 1/n, divided by 1 - 1/n); the generalized risks themselves agree.
    """
    coverage, _, generalized = risk_coverage_points(uncertainty, errors)
    x = np.concatenate([[0.0], coverage])
    y = np.concatenate([[0.0], generalized])
    return _trapezoid(y, x)


def risk_at_coverage(uncertainty, errors, level=0.8):
    """The selective risk at coverage `level` on aurc's curve (its points, with the flat point at
    coverage 0, straight between them: the curve whose area aurc is). Written as a scan over
    the segments: the one whose coverage interval holds `level`, read off linearly."""
    coverage, selective, _ = risk_coverage_points(uncertainty, errors)
    x = [0.0, *coverage]
    y = [selective[0], *selective]
    for k in range(1, len(x)):
        if x[k - 1] <= level <= x[k]:
            t = (level - x[k - 1]) / (x[k] - x[k - 1])
            return float(y[k - 1] + t * (y[k] - y[k - 1]))
    raise AssertionError('level outside [0, 1]')


def coverage_at_risk(uncertainty, errors, level=0.05):
    """The largest coverage at which aurc's curve (as in risk_at_coverage) has a selective risk
    <= `level`, 0 if none: over every segment of the curve, the largest coverage on it at or
    below `level` (its right end, the point where it crosses `level`, or its left end), and the
    largest of those."""
    coverage, selective, _ = risk_coverage_points(uncertainty, errors)
    x = [0.0, *coverage]
    y = [selective[0], *selective]
    best = 0.0
    for k in range(1, len(x)):
        (x0, y0), (x1, y1) = (x[k - 1], y[k - 1]), (x[k], y[k])
        if y1 <= level:
            best = max(best, x1)
        elif y0 <= level:  # rising through the level inside the segment
            best = max(best, x0 + (level - y0) / (y1 - y0) * (x1 - x0))
    return float(best)


def aurc_loop(uncertainty, errors):
    """aurc from masks, one per distinct uncertainty value: accepted = uncertainty <= t.
    O(n * m); for a few thousand samples at most."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    errors = np.asarray(errors, dtype=bool)
    n = len(uncertainty)
    x, y = [0.0], [None]
    for t in np.unique(uncertainty):  # ascending
        accepted = uncertainty <= t
        x.append(np.sum(accepted) / n)
        y.append(np.sum(errors & accepted) / np.sum(accepted))
    y[0] = y[1]  # the flat extension to coverage 0
    return _trapezoid(y, x)


def augrc_loop(uncertainty, errors):
    """augrc from masks, one per distinct uncertainty value. O(n * m)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    errors = np.asarray(errors, dtype=bool)
    n = len(uncertainty)
    x, y = [0.0], [0.0]
    for t in np.unique(uncertainty):
        accepted = uncertainty <= t
        x.append(np.sum(accepted) / n)
        y.append(np.sum(errors & accepted) / n)
    return _trapezoid(y, x)


# ---- depth: sparsification (Poggi et al., CVPR 2020) ----

# What mono-uncertainty's compute_aucs uses (intervals = 50), written as it writes them so that
# the floats are the same: percentiles 100/50 * t for t = 0..49, i.e. fractions 0, 0.02, ..,
# 0.98 removed, and the curve's abscissae 1/50 * t for t = 0..50.
INTERVALS = 50
POGGI_PERCENTILES = [100.0 / INTERVALS * t for t in range(INTERVALS)]
POGGI_X = [1.0 / INTERVALS * t for t in range(INTERVALS + 1)]

DEPTH_METRICS = ('abs_rel', 'rmse', 'a1')


def depth_metric(pred, gt, metric):
    """One image's depth metric on the given pixels, as compute_eigen_errors_v2(...,
    reduce_mean=True) computes it for the sparsification curves:

        'abs_rel'  mean |gt - pred| / gt
        'rmse'     sqrt(mean (gt - pred)^2)                          (metres)
        'a1'       mean [max(pred / gt, gt / pred) >= 1.25] = 1 - delta1

    'a1' is the fraction of OUTLIERS, 1 - a1, so that lower is better for all three (Poggi's
    code: "invert to get outliers").
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if metric == 'abs_rel':
        return float(np.mean(np.abs(gt - pred) / gt))
    if metric == 'rmse':
        return float(np.sqrt(np.mean((gt - pred) ** 2)))
    if metric == 'a1':
        return float(np.mean(np.maximum(gt / pred, pred / gt) >= 1.25))
    raise ValueError(f'unknown depth metric {metric!r}; one of {DEPTH_METRICS}')


def depth_pixel_error(pred, gt, metric):
    """The per-pixel "true uncertainty" by which the oracle removes pixels (the most wrong
    first), as compute_aucs takes it from compute_eigen_errors_v2(..., reduce_mean=False):

        'abs_rel'  |gt - pred| / gt
        'rmse'     (gt - pred)^2
        'a1'       max(pred / gt, gt / pred)      the continuous ratio, not the 0/1 outlier flag

    so the a1 oracle removes the pixels with the largest ratio first.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if metric == 'abs_rel':
        return np.abs(gt - pred) / gt
    if metric == 'rmse':
        return (gt - pred) ** 2
    if metric == 'a1':
        return np.maximum(gt / pred, pred / gt)
    raise ValueError(f'unknown depth metric {metric!r}; one of {DEPTH_METRICS}')


def kept_pixels(removal_key, percentile):
    """Poggi's subset after removing `percentile` per cent of the pixels with the LARGEST
    removal_key (an uncertainty, or the true error for the oracle), as compute_aucs does:

        keep = (-key >= np.percentile(-key, percentile))      numpy's default 'linear' method

    How many go: the q-th percentile of the n values -key sorted ascending, x_(0) <= .. <=
    x_(n-1), is x_(j) + g (x_(j+1) - x_(j)) with j + g = q/100 (n - 1), and everything strictly
    below it is removed. With distinct values that is ceil(q/100 (n - 1)) pixels, the most
    uncertain ones: slightly FEWER than the fraction f = q/100 of n (f (n - 1) rounded up, not
    f n), and none at f = 0. Floating point moves this by one pixel now and then (about 1 in
    1000 pairs of n and f): numpy's index (n - 1) * (q / 100) can land a hair off a whole
    number, and an interpolated value can round onto x_(j). Calling np.percentile as Poggi's code does reproduces
    this exactly for the numpy installed (another numpy version may order that arithmetic
    differently and move a different odd pixel).
    Ties: a pixel tied with the percentile value is always kept, so a tie group straddling the
    cut is kept whole (fewer removed), and no order among tied pixels is ever chosen.
    """
    negated = -np.asarray(removal_key, dtype=np.float64)  # compute_aucs: "uncert = -uncert"
    return negated >= np.percentile(negated, percentile)


def sparsification(pred, gt, uncertainty, metric, fractions=None):
    """One image's sparsification curve (Poggi et al., "On the uncertainty of self-supervised
    monocular depth estimation", CVPR 2020; mono-uncertainty evaluate.py, compute_aucs):
    for each fraction f, remove the fraction f of the valid pixels with the largest
    uncertainty (by kept_pixels' percentile rule, with percentile 100 f) and compute
    depth_metric on the rest.

    pred, gt, uncertainty (n,): one image's valid pixels (Poggi's evaluate() keeps 1e-3 < gt <
    max depth inside the Eigen crop and clips pred to [1e-3, max depth] before this).
    fractions: None for Poggi's exact 0, 0.02, .., 0.98 (percentiles 100/50 * t); otherwise
    percentiles 100 * f. Returns a float64 array, one value per fraction, WITHOUT the value 0
    that compute_aucs appends for f = 1 (ause_aurg appends it). For 'a1' the curve is of
    1 - a1 (lower is better).
    """
    percentiles = POGGI_PERCENTILES if fractions is None else [100.0 * f for f in fractions]
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    curve = []
    for q in percentiles:
        keep = kept_pixels(uncertainty, q)
        curve.append(depth_metric(pred[keep], gt[keep], metric))
    return np.array(curve)


def ause_aurg(pred, gt, uncertainty, metric):
    """AUSE and AURG of one image, exactly as mono-uncertainty's compute_aucs (intervals=50):

        x       = 0, 0.02, .., 1                                          (51 points)
        sparse  = sparsification(pred, gt, uncertainty, metric) + [0]      (0 at x = 1)
        oracle  = sparsification(pred, gt, depth_pixel_error(pred, gt, metric), metric) + [0]
        random  = depth_metric(pred, gt, metric) at every x: Poggi's "random" curve is the
                  metric of the whole image, constant (what removing pixels at random
                  keeps on average for a mean; it does NOT drop to 0 at x = 1)
        AUSE    = trapz(sparse, x) - trapz(oracle, x)    area between sparsification and oracle
        AURG    = random[0] - trapz(sparse, x)           area between random and sparsification

    trapz is the trapezoid rule on the uniform grid (dx = 0.02, half weight at both ends; the
    random curve's area is random[0] * 1). Curves are not normalised (torch-uncertainty's AUSE
    normalises by the total error and removes pixels one at a time: a different number).
    The data set's AUSE and AURG are the MEAN OVER IMAGES of these per-image values
    (evaluate(): aucs[m] collects one per image, then np.array(aucs[m]).mean(0)), not the
    values of one curve over all pixels.

    Returns a dict: 'ause', 'aurg' (floats) and the curves 'x', 'sparse', 'oracle', 'random'.
    """
    sparse = list(sparsification(pred, gt, uncertainty, metric)) + [0.0]
    oracle = list(sparsification(pred, gt, depth_pixel_error(pred, gt, metric), metric)) + [0.0]
    random = [depth_metric(pred, gt, metric)] * (INTERVALS + 1)
    area_sparse = _trapezoid(sparse, POGGI_X)
    return {'ause': area_sparse - _trapezoid(oracle, POGGI_X), 'aurg': random[0] - area_sparse,
            'x': np.array(POGGI_X), 'sparse': np.array(sparse), 'oracle': np.array(oracle),
            'random': np.array(random)}


# ---- depth: the predictive Gaussian ----

def gaussian_nll(mu, sigma2, y):
    """Gaussian negative log-likelihood with the constant, the mean over pixels of

        0.5 log(2 pi sigma2) + (y - mu)^2 / (2 sigma2)

    = -log N(y; mu, sigma2); sigma2 is the variance (not the standard deviation), with no
    clamping (torch's gaussian_nll_loss clamps it to eps=1e-6 and drops the constant unless
    full=True).
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(0.5 * np.log(2.0 * math.pi * sigma2) + (y - mu) ** 2 / (2.0 * sigma2)))


def coverage(mu, sigma2, y, k):
    """Fraction of pixels inside the k-sigma interval: mean [|y - mu| <= k sqrt(sigma2)]
    (the boundary counts as inside). For y drawn from N(mu, sigma2) it is erf(k / sqrt 2):
    0.683, 0.954, 0.997 for k = 1, 2, 3.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.abs(y - mu) <= k * np.sqrt(sigma2)))


# ---- self-check ----

def _record(diffs, name, a, b):
    """Keep the largest |a - b| seen under `name`."""
    d = float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
    diffs[name] = max(diffs.get(name, 0.0), d)


def _self_check(seed=0, trials=200):
    """Compare each function with scikit-learn / scipy (each only when importable) and with
    its own loop version on random data, half of it with many ties; print the largest
    differences."""
    try:
        import sklearn.metrics as skm
        have_sklearn = True
    except ImportError:
        have_sklearn = False
        print('scikit-learn is not importable: its comparisons are skipped')
    try:
        import scipy.integrate
        import scipy.stats
        have_scipy = True
    except ImportError:
        have_scipy = False
        print('scipy is not importable: its comparisons are skipped')

    rng = np.random.default_rng(seed)
    diffs = {}
    off_by_one, pairs = 0, 0  # (image, fraction) pairs one pixel off ceil(f (n - 1)), checked
    for trial in range(trials):
        tied = trial % 2 == 0
        n = int(rng.integers(20, 300))
        # scores with some signal; on a coarse grid (a few dozen distinct values) when tied
        positives = rng.random(n) < rng.uniform(0.1, 0.9)
        positives[0], positives[1] = True, False  # both classes present
        scores = rng.normal(size=n) + rng.uniform(0, 2) * positives
        if tied:
            scores = np.round(scores * rng.choice([1, 2, 4]))

        _record(diffs, 'threshold_counts vs threshold_counts_loop',
                np.concatenate(threshold_counts(scores, positives)),
                np.concatenate(threshold_counts_loop(scores, positives)))
        if n <= 200:
            _record(diffs, 'auroc vs auroc_loop',
                    auroc(scores, positives), auroc_loop(scores, positives))
        # the scores as an uncertainty, the positives as errors
        _record(diffs, 'aurc vs aurc_loop', aurc(scores, positives), aurc_loop(scores, positives))
        _record(diffs, 'augrc vs augrc_loop',
                augrc(scores, positives), augrc_loop(scores, positives))
        if have_sklearn:
            sk_auroc = skm.roc_auc_score(positives, scores)
            _record(diffs, 'auroc vs sklearn roc_auc_score', auroc(scores, positives), sk_auroc)
            _record(diffs, 'aupr vs sklearn average_precision_score',
                    aupr(scores, positives), skm.average_precision_score(positives, scores))
            fpr, tpr, _ = skm.roc_curve(positives, scores, drop_intermediate=False)
            _record(diffs, 'fpr_at_95_tpr vs sklearn roc_curve fpr[argmax(tpr >= 0.95)]',
                    fpr_at_95_tpr(scores, positives), fpr[np.argmax(tpr >= 0.95)])
            acc = 1.0 - np.mean(positives)
            _record(diffs, 'augrc vs (1 - sklearn AUROC) acc (1 - acc) + (1 - acc)^2 / 2',
                    augrc(scores, positives),
                    (1.0 - sk_auroc) * acc * (1.0 - acc) + 0.5 * (1.0 - acc) ** 2)

        # segmentation probabilities, 2 to 5 classes, every class present
        num_classes = int(rng.integers(2, 6))
        logits = rng.normal(size=(n, num_classes)) * 2
        probs = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
        labels = rng.integers(0, num_classes, n)
        labels[:num_classes] = np.arange(num_classes)
        if have_sklearn:
            _record(diffs, 'nll vs sklearn log_loss', nll(probs, labels),
                    skm.log_loss(labels, probs, labels=np.arange(num_classes)))
            _record(diffs, 'brier vs sklearn brier_score_loss(scale_by_half=False)',
                    brier(probs, labels),
                    skm.brier_score_loss(labels, probs, labels=np.arange(num_classes),
                                         scale_by_half=False))

        # depth: a Gaussian prediction of one image, its curves
        gt = rng.uniform(1.0, 10.0, n)
        sigma2 = rng.uniform(0.01, 1.0, n)
        pred = np.clip(gt + rng.normal(size=n) * np.sqrt(sigma2), 1e-3, None)
        uncertainty = np.round(sigma2, 1) if tied else sigma2
        if have_scipy:
            _record(diffs, 'gaussian_nll vs -mean scipy.stats.norm.logpdf',
                    gaussian_nll(pred, sigma2, gt),
                    -np.mean(scipy.stats.norm.logpdf(gt, loc=pred, scale=np.sqrt(sigma2))))
        for metric in DEPTH_METRICS:
            result = ause_aurg(pred, gt, uncertainty, metric)
            assert result['ause'] >= -1e-12, (metric, result['ause'])  # the oracle is optimal
            if have_scipy:
                for curve in ('sparse', 'oracle'):
                    _record(diffs, 'ause_aurg curve areas vs scipy.integrate.trapezoid',
                            _trapezoid(result[curve], result['x']),
                            scipy.integrate.trapezoid(result[curve], result['x']))
        if not tied:  # distinct uncertainties: removed = ceil(f (n - 1)), f = t / 50
            for t, q in enumerate(POGGI_PERCENTILES):
                removed = n - int(np.sum(kept_pixels(uncertainty, q)))
                off_by = abs(removed - (-(-t * (n - 1) // INTERVALS)))  # exact integer ceil
                assert off_by <= 1, (n, q, removed)
                off_by_one += off_by
                pairs += 1

    # coverage: a statistical check on Gaussian draws (10^6 draws: noise ~ 5e-4)
    n = 10 ** 6
    mu, sigma2 = rng.normal(size=n), rng.uniform(0.1, 2.0, n)
    y = mu + rng.normal(size=n) * np.sqrt(sigma2)
    for k in (1, 2, 3):
        _record(diffs, 'coverage vs erf(k / sqrt 2) on 10^6 Gaussian draws (statistical)',
                coverage(mu, sigma2, y, k), math.erf(k / math.sqrt(2)))

    width = max(len(name) for name in diffs)
    for name, d in diffs.items():
        print(f'{name:<{width}}  max |diff| = {d:.3g}')
    print(f'sparsification: {off_by_one} of {pairs} (image, fraction) pairs with distinct '
          'uncertainties remove one pixel more or fewer than ceil(f (n - 1)) (see kept_pixels)')


if __name__ == '__main__':
    _self_check()
