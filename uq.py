"""
Uncertainty quantification for joint semantic segmentation and monocular depth estimation,
and the metrics that judge it (Landgraf et al., Section 4 "Metrics", Eq. 13).

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
        ...  # probs, entropy, mean, variance from the model and an uncertainty method
        seg.update(probs, label, entropy)
        dep.update(mean, variance, depth)
    seg.reduce(); dep.reduce()  # sum the statistics over ranks (a no-op without DDP)
    print(seg.compute(), dep.compute())
"""

import math

import torch
import torch.distributed as dist

# ---- Metrics ----

IGNORE_INDEX = 255  # label of unlabelled pixels; they count in no segmentation metric


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
    """Semantic segmentation: mIoU, pixel accuracy, ECE and uncertainty quality.

    Only labelled pixels (label != 255) count. The prediction is the argmax of the
    probabilities, the confidence their max (ties go to the lowest class index).
    - IoU_c = TP / (TP + FP + FN) from the confusion matrix; a class with TP + FP + FN = 0
      (absent from prediction and ground truth) gets NaN and is left out of the mean (mIoU).
      pixel_acc = sum TP / number of labelled pixels.
    - ECE (Naeini et al.) with M equal-width bins, bin m holding confidences in
      ((m-1)/M, m/M] (a confidence of exactly 0 joins the first bin):
      ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| = sum_m |correct_m - sum conf_m| / n.
    - Uncertainty quality (see StreamingMetric) with accurate iff prediction == label,
      the threshold being the mean uncertainty over each image's labelled pixels.
    compute() -> {'miou', 'iou' (list of K), 'pixel_acc', 'ece', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu'}, Python floats, NaN where nothing was counted.
    """

    def __init__(self, num_classes, num_bins=15, device='cpu'):
        K, M = num_classes, num_bins
        super().__init__(
            device,
            confusion=((K, K), torch.int64),  # rows: ground truth, columns: prediction
            bin_count=((M,), torch.int64),
            bin_correct=((M,), torch.int64),
            bin_confidence=((M,), torch.float64),  # sum of the confidences in each bin
        )
        self.num_classes, self.num_bins = K, M

    def update(self, probs, label, uncertainty):
        """probs: (B, K, H, W) softmax (mean over samples for MCD and ensembles);
        label: (B, H, W) int64 in [0, K) or 255; uncertainty: (B, H, W), e.g. entropy."""
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

    def compute(self):
        cm = self.stats['confusion'].double()
        tp = cm.diag()
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)  # TP / (TP + FP + FN); 0/0 = NaN: excluded
        n = self.stats['bin_count'].sum().item()
        gap = (self.stats['bin_correct'] - self.stats['bin_confidence']).abs().sum().item()
        return {
            'miou': iou.nanmean().item(),
            'iou': iou.tolist(),
            'pixel_acc': _ratio(tp.sum().item(), n),
            'ece': _ratio(gap, n),
            **self._uncertainty_metrics(),
        }


class DepthMetrics(StreamingMetric):
    """Monocular depth: RMSE, AbsRel, delta1/2/3 and uncertainty quality.

    Only valid pixels count: ground truth y > 0 and finite. All metrics pool the valid
    pixels of the whole data set (not a mean of per-image values), in float64:
    RMSE = sqrt(sum (mu - y)^2 / n), AbsRel = sum |mu - y| / y / n, and delta_i = fraction
    of pixels with delta = max(mu/y, y/mu) < 1.25^i (Eq. 13); a prediction mu = 0 has
    delta = inf, so it is inaccurate. Uncertainty quality (see StreamingMetric) calls a
    pixel accurate iff delta < 1.25, the threshold being the mean uncertainty over each
    image's valid pixels.
    compute() -> {'rmse', 'abs_rel', 'delta1', 'delta2', 'delta3', 'p_accurate_certain',
    'p_uncertain_inaccurate', 'pavpu'}, Python floats, NaN where nothing was counted.
    """

    DELTA_THRESHOLDS = (1.25, 1.25 ** 2, 1.25 ** 3)

    def __init__(self, device='cpu'):
        super().__init__(
            device,
            n=((), torch.int64),  # number of valid pixels
            squared_error=((), torch.float64),
            abs_rel=((), torch.float64),
            delta_counts=((3,), torch.int64),
        )

    def update(self, mean, uncertainty, depth):
        """mean: (B, H, W) predicted depth mu in metres (>= 0); uncertainty: (B, H, W),
        e.g. predictive variance; depth: (B, H, W) ground truth y in metres (valid iff > 0
        and finite)."""
        valid = (depth > 0) & depth.isfinite()
        mu, y = mean.double(), depth.double()
        delta = torch.maximum(mu / y, y / mu)  # (B, H, W), Eq. 13; garbage where not valid
        self._count_uncertainty(delta < 1.25, uncertainty, valid)

        mu, y, delta = mu[valid], y[valid], delta[valid]  # (n,)
        self._add('n', valid.sum())
        self._add('squared_error', ((mu - y) ** 2).sum())
        self._add('abs_rel', ((mu - y).abs() / y).sum())
        self._add('delta_counts', torch.stack([(delta < t).sum() for t in self.DELTA_THRESHOLDS]))

    def compute(self):
        n = self.stats['n'].item()
        d1, d2, d3 = self.stats['delta_counts'].tolist()
        return {
            'rmse': math.sqrt(_ratio(self.stats['squared_error'].item(), n)),
            'abs_rel': _ratio(self.stats['abs_rel'].item(), n),
            'delta1': _ratio(d1, n),
            'delta2': _ratio(d2, n),
            'delta3': _ratio(d3, n),
            **self._uncertainty_metrics(),
        }
