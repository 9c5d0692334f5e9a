"""
Tests of the metrics in metrics.py against brute-force references written plainly (a Python loop
over pixels), hand-made edge cases, streaming over uneven batches and reduce() across two
gloo ranks.
"""

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import brute_force as bf
import metrics

K = 5  # classes in the random data
N, H, W = 10, 9, 11  # images, height, width


# ---- data ----

def random_data(seed=0):
    """Segmentation and depth batches of N images that differ in confidence, error and
    uncertainty scale, with ignore labels and invalid depths mixed in; image 3 is all
    ignore and image 5 all invalid. Uncounted pixels get huge uncertainties so that
    they would move a threshold that wrongly includes them."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 4.0, size=(N, 1, 1, 1))  # sharper or flatter softmax per image
    logits = rng.normal(size=(N, K, H, W)) * scale
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    label = np.where(rng.random((N, H, W)) < 0.6, pred, rng.integers(0, K, (N, H, W)))
    label[rng.random((N, H, W)) < 0.15] = 255
    label[3] = 255
    entropy = -(probs * np.log(probs)).sum(1)
    seg_unc = entropy * rng.uniform(0.1, 10.0, size=(N, 1, 1))
    seg_unc[label == 255] = 50.0

    y = rng.uniform(0.5, 10.0, size=(N, H, W))
    r = rng.random((N, H, W))
    y[r < 0.06] = 0.0
    y[(r >= 0.06) & (r < 0.09)] = np.nan
    y[(r >= 0.09) & (r < 0.11)] = np.inf
    y[(r >= 0.11) & (r < 0.13)] = -1.0
    y[5] = 0.0
    sigma = rng.uniform(0.05, 0.6, size=(N, 1, 1))  # per-image error scale
    mu = np.nan_to_num(y, nan=3.0, posinf=3.0).clip(0.5) * np.exp(rng.normal(size=(N, H, W)) * sigma)
    mu[rng.random((N, H, W)) < 0.03] = 0.0
    valid = (y > 0) & np.isfinite(y)
    err = np.abs(mu - np.where(valid, y, 0.0))
    depth_unc = err * rng.uniform(0.5, 1.5, size=(N, H, W)) * rng.uniform(0.1, 10.0, size=(N, 1, 1))
    depth_unc[~valid] = 1e3

    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
    seg = (f32(probs), torch.from_numpy(label.astype(np.int64)), f32(seg_unc))
    depth = (f32(mu), f32(depth_unc), f32(y))
    return seg, depth


def batches(tensors, sizes):
    """Split a tuple of (N, ...) tensors along dim 0 into consecutive batches of `sizes`."""
    return list(zip(*(t.split(list(sizes)) for t in tensors)))


def run_seg(seg_batches, num_classes=K, num_bins=15):
    m = metrics.SegMetrics(num_classes, num_bins)
    for probs, label, unc in seg_batches:
        m.update(probs, label, unc)
    return m


def run_depth(depth_batches):
    m = metrics.DepthMetrics()
    for mean, unc, depth in depth_batches:
        m.update(mean, unc, depth)
    return m


# ---- brute-force references ----

def uncertainty_reference(images):
    """images: one list per image of (accurate, uncertainty) for its counted pixels."""
    n_ac = n_au = n_ic = n_iu = 0
    for pixels in images:
        if not pixels:
            continue
        threshold = sum(u for _, u in pixels) / len(pixels)
        for accurate, u in pixels:
            certain = u <= threshold
            n_ac += accurate and certain
            n_au += accurate and not certain
            n_ic += (not accurate) and certain
            n_iu += (not accurate) and not certain
    nan = float('nan')
    return {
        'p_accurate_certain': n_ac / (n_ac + n_ic) if n_ac + n_ic else nan,
        'p_uncertain_inaccurate': n_iu / (n_ic + n_iu) if n_ic + n_iu else nan,
        'pavpu': (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu) if n_ac + n_au + n_ic + n_iu else nan,
    }


def nll_reference(q, labels):
    """brute_force.nll, with q_y = 0 counted as float32's smallest normal, as SegMetrics counts
    it (test_nll_of_a_zero_probability_is_finite) rather than as an infinite loss."""
    return bf.nll(np.maximum(q, np.finfo(np.float32).tiny), labels)


def histogram_bin(score, high):
    """The bin of a score in SCORE_BINS equal bins over [0, high], clamped: the tie groups of
    the histogram-bounded ranking metrics, written out."""
    return min(max(math.floor(score / high * metrics.SCORE_BINS), 0), metrics.SCORE_BINS - 1)


def ranking_reference(bins, positives):
    """The failure-detection and risk-coverage metrics of brute_force on scores tied within
    each bin, and each metric's bound: how far it moves when every bin's positives are ranked
    first, or last, among its negatives (half a bin either way keeps the bins' order)."""
    bins, positives = np.asarray(bins, dtype=np.float64), np.asarray(positives, dtype=bool)
    out = {}
    for name, metric in (('auroc_failure', bf.auroc), ('aupr_failure', bf.aupr), ('aurc', bf.aurc), ('augrc', bf.augrc),
                         ('risk_at_80', bf.risk_at_coverage), ('coverage_at_5', bf.coverage_at_risk)):
        tied = metric(bins, positives)
        extremes = [metric(bins + 0.5 * positives, positives), metric(bins - 0.5 * positives, positives)]
        out[name], out[f'{name}_bound'] = tied, max(abs(e - tied) for e in extremes)
    return out


def seg_reference(probs, label, unc, num_classes, num_bins=15):
    probs, label, unc = probs.numpy().astype(np.float64), label.numpy(), unc.numpy().astype(np.float64)
    B, _, Hh, Ww = probs.shape
    preds, labels, confs, images = [], [], [], []
    for b in range(B):
        pixels = []
        for i in range(Hh):
            for j in range(Ww):
                if label[b, i, j] == 255:
                    continue
                p = probs[b, :, i, j]
                pred = int(np.argmax(p))
                preds.append(pred)
                labels.append(int(label[b, i, j]))
                confs.append(float(p.max()))
                pixels.append((pred == labels[-1], float(unc[b, i, j])))
        images.append(pixels)
    n = len(preds)

    iou = []
    for c in range(num_classes):
        tp = sum(p == c and l == c for p, l in zip(preds, labels))
        fp = sum(p == c and l != c for p, l in zip(preds, labels))
        fn = sum(p != c and l == c for p, l in zip(preds, labels))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else float('nan'))
    present = [v for v in iou if not math.isnan(v)]

    ece = 0.0
    for m in range(1, num_bins + 1):
        in_bin = [k for k, c in enumerate(confs)
                  if (m - 1) / num_bins < c <= m / num_bins or (m == 1 and c == 0)]
        if in_bin:
            acc = sum(preds[k] == labels[k] for k in in_bin) / len(in_bin)
            conf = sum(confs[k] for k in in_bin) / len(in_bin)
            ece += len(in_bin) / n * abs(acc - conf)

    labelled = label != 255
    q = probs.transpose(0, 2, 3, 1)[labelled]  # (n, K)
    errors = [p != y for p, y in zip(preds, labels)]
    bins = [histogram_bin(u, math.log(num_classes)) for pixels in images for _, u in pixels]
    out = {
        'pixels': n,
        'miou': sum(present) / len(present) if present else float('nan'),
        'iou': iou,
        'pixel_acc': sum(p == l for p, l in zip(preds, labels)) / n if n else float('nan'),
        'ece': ece if n else float('nan'),
        **uncertainty_reference(images),
        'nll': nll_reference(q, label[labelled]), 'brier': bf.brier(q, label[labelled]),
        **ranking_reference(bins, errors),
        'entropy_mean': float(np.mean(unc[labelled])),
        'aleatoric_mean': float('nan'), 'mutual_information_mean': float('nan'),  # not given
    }
    # RSS: the harmonic mean of four numbers, 4 / (1/a + 1/b + 1/c + 1/d); its limit 0 where one is 0
    parts = (out['miou'], 1 - out['ece'], out['p_accurate_certain'], out['p_uncertain_inaccurate'])
    out['rss'] = (float('nan') if any(math.isnan(p) for p in parts) else
                  0.0 if 0 in parts else 4 / sum(1 / p for p in parts))
    return out


def depth_reference(mean, unc, depth):
    mean, unc, depth = (t.numpy().astype(np.float64) for t in (mean, unc, depth))
    B, Hh, Ww = depth.shape
    sq, rel, deltas, images = [], [], [], []
    for b in range(B):
        pixels = []
        for i in range(Hh):
            for j in range(Ww):
                y, mu = float(depth[b, i, j]), float(mean[b, i, j])
                if not (y > 0 and math.isfinite(y)):
                    continue
                delta = math.inf if mu == 0 else max(mu / y, y / mu)
                sq.append((mu - y) ** 2)
                rel.append(abs(mu - y) / y)
                deltas.append(delta)
                pixels.append((bool(delta < 1.25), float(unc[b, i, j])))
        images.append(pixels)
    n = len(sq)
    frac = lambda t: sum(d < t for d in deltas) / n if n else float('nan')
    valid = (depth > 0) & np.isfinite(depth)
    sparse = {f'{kind}_{m}': [] for kind in ('ause', 'aurg') for m in ('rmse', 'absrel', 'a1')}
    for b in range(B):  # sparsification is per image, then the mean over images with valid pixels
        if valid[b].any():
            for m, name in (('rmse', 'rmse'), ('abs_rel', 'absrel'), ('a1', 'a1')):
                pred = np.clip(mean[b][valid[b]], 1e-3, None)  # Poggi's evaluation clips at 1 mm
                image = bf.ause_aurg(pred, depth[b][valid[b]], unc[b][valid[b]], m)
                sparse[f'ause_{name}'].append(image['ause'])
                sparse[f'aurg_{name}'].append(image['aurg'])
    mu, var, y = mean[valid], unc[valid], depth[valid]
    return {
        'pixels': n,
        'rmse': math.sqrt(sum(sq) / n) if n else float('nan'),
        'abs_rel': sum(rel) / n if n else float('nan'),
        'delta1': frac(1.25),
        'delta2': frac(1.25 ** 2),
        'delta3': frac(1.25 ** 3),
        **uncertainty_reference(images),
        'nll': bf.gaussian_nll(mu, var, y), 'variance_mean': float(np.mean(var)),
        'coverage_1sigma': bf.coverage(mu, var, y, 1), 'coverage_2sigma': bf.coverage(mu, var, y, 2),
        **{k: float(np.mean(v)) for k, v in sparse.items()},
        'aleatoric_var_mean': float('nan'), 'epistemic_var_mean': float('nan'),  # not given
        'interval_coverage': float('nan'), 'interval_width': float('nan'),  # no interval_scale
    }


def assert_close(got, want, tol=1e-12):
    """Same keys; numbers equal to `tol` (relative and absolute), NaN only where NaN."""
    assert got.keys() == want.keys()
    for key in want:
        g, w = np.atleast_1d(got[key]), np.atleast_1d(want[key])
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=key)  # NaN == NaN here


SEG_KEYS = {'pixels', 'miou', 'iou', 'pixel_acc', 'ece', 'p_accurate_certain', 'p_uncertain_inaccurate', 'pavpu',
            'nll', 'brier', 'auroc_failure', 'aupr_failure', 'aurc', 'augrc', 'auroc_failure_bound',
            'aupr_failure_bound', 'aurc_bound', 'augrc_bound', 'risk_at_80', 'risk_at_80_bound', 'coverage_at_5',
            'coverage_at_5_bound', 'entropy_mean', 'aleatoric_mean', 'mutual_information_mean', 'rss'}
DEPTH_KEYS = {'pixels', 'rmse', 'abs_rel', 'delta1', 'delta2', 'delta3',
              'p_accurate_certain', 'p_uncertain_inaccurate', 'pavpu', 'nll', 'variance_mean', 'coverage_1sigma',
              'coverage_2sigma', 'ause_rmse', 'ause_absrel', 'ause_a1', 'aurg_rmse', 'aurg_absrel', 'aurg_a1',
              'aleatoric_var_mean', 'epistemic_var_mean', 'interval_coverage', 'interval_width'}


# ---- against the references ----

def test_seg_matches_reference():
    seg, _ = random_data()
    got = run_seg([seg]).compute()
    want = seg_reference(*seg, num_classes=K)
    assert set(got) == SEG_KEYS
    assert all(type(v) is float for k, v in got.items() if k not in ('iou', 'pixels')) and type(got['pixels']) is int
    assert all(type(v) is float for v in got['iou']) and len(got['iou']) == K
    assert 0 < got['ece'] and 0 < got['p_uncertain_inaccurate'] < 1  # a non-trivial case
    assert_close(got, want)


def test_depth_matches_reference():
    _, depth = random_data()
    got = run_depth([depth]).compute()
    want = depth_reference(*depth)
    assert set(got) == DEPTH_KEYS
    assert all(type(v) is float for k, v in got.items() if k != 'pixels') and type(got['pixels']) is int
    assert want['delta1'] < want['delta2'] < want['delta3'] < 1  # every band is populated
    assert_close(got, want)


def test_threshold_is_per_image_mean():
    # image 0 has small uncertainties, image 1 large ones: a data-set-wide threshold would
    # call every pixel of image 0 certain and every pixel of image 1 uncertain
    mean = torch.tensor([[[1.0, 2.0, 1.0]], [[1.0, 2.0, 1.0]]])  # 2nd pixel inaccurate
    depth = torch.ones(2, 1, 3)
    unc = torch.tensor([[[0.1, 0.3, 0.2]], [[10.0, 30.0, 20.0]]])  # thresholds 0.2 and 20
    got = run_depth([(mean, unc, depth)]).compute()
    # per image: ac, iu, ac (u = mean is certain) -> n_ac = 4, n_iu = 2
    assert got['p_accurate_certain'] == 1.0
    assert got['p_uncertain_inaccurate'] == 1.0
    assert got['pavpu'] == 1.0


# ---- hand-made cases ----

def test_perfect_confident_prediction():
    label = torch.tensor([[[0, 1, 2], [2, 255, 1]]])
    probs = torch.nn.functional.one_hot(label.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    got = run_seg([(probs, label, torch.zeros(1, 2, 3))], num_classes=3).compute()
    assert got['miou'] == 1.0 and got['iou'] == [1.0, 1.0, 1.0] and got['pixel_acc'] == 1.0
    assert got['ece'] == 0.0
    assert got['p_accurate_certain'] == 1.0 and got['pavpu'] == 1.0
    assert math.isnan(got['p_uncertain_inaccurate'])  # no inaccurate pixel: nothing to measure


def test_all_ignore_image_contributes_nothing():
    (probs, label, unc), (mean, dunc, depth) = random_data()
    # image 0 alone, then together with image 1 made all-ignore / all-invalid, in both orders
    pair = lambda t: torch.cat([t[:1], t[1:2]])[order]
    empty_label = torch.full((1, H, W), 255)
    invalid = torch.tensor([0.0, -1.0, math.nan, math.inf]).repeat(H * W)[:H * W].view(1, H, W)
    seg_alone = run_seg([(probs[:1], label[:1], unc[:1])]).compute()
    depth_alone = run_depth([(mean[:1], dunc[:1], depth[:1])]).compute()
    for order in ([0, 1], [1, 0]):
        seg_both = run_seg([(pair(probs), torch.cat([label[:1], empty_label])[order], pair(unc))])
        assert_close(seg_both.compute(), seg_alone, tol=0)
        depth_both = run_depth([(pair(mean), pair(dunc), torch.cat([depth[:1], invalid])[order])])
        assert_close(depth_both.compute(), depth_alone, tol=0)


def test_nothing_counted_gives_nan():
    seg = run_seg([(torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2), 255), torch.ones(1, 2, 2))], 2)
    got = seg.compute()
    assert got.pop('pixels') == 0 and all(math.isnan(v) for v in got.pop('iou') + list(got.values()))
    depth = run_depth([(torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, 2))]).compute()
    assert depth.pop('pixels') == 0 and all(math.isnan(v) for v in depth.values())


def test_single_class():
    label = torch.tensor([[[0, 0, 255], [0, 0, 0]]])
    got = run_seg([(torch.ones(1, 1, 2, 3), label, torch.rand(1, 2, 3))], num_classes=1).compute()
    assert got['iou'] == [1.0] and got['miou'] == 1.0 and got['pixel_acc'] == 1.0
    assert got['ece'] == 0.0 and got['p_accurate_certain'] == 1.0


def test_absent_class_is_excluded_from_mean():
    # K = 3; ground truth is all class 0, one pixel predicted as 1, class 2 appears nowhere
    label = torch.zeros(1, 1, 4, dtype=torch.int64)
    pred = torch.tensor([[[0, 0, 1, 0]]])
    probs = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2) * 0.6 + 0.4 / 3
    got = run_seg([(probs, label, torch.zeros(1, 1, 4))], num_classes=3).compute()
    assert got['iou'][:2] == [0.75, 0.0] and math.isnan(got['iou'][2])
    assert got['miou'] == 0.375  # (3/4 + 0) / 2, not / 3
    assert got['pixel_acc'] == 0.75


def test_ece_bin_edges():
    # M = 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; confidences on the edges, and
    # bins whose gaps differ in sign, so that half-open [ ) bins would give 2.6 / 5
    probs = torch.tensor([
        [0.5, 0.25, 0.25, 0.0, 0.0],  # conf .5 (bin 2), pred 0, label 1: wrong
        [0.75, 0.25, 0.0, 0.0, 0.0],  # conf .75 (bin 3), pred 0, label 1: wrong
        [0.4, 0.3, 0.3, 0.0, 0.0],  # conf .4 (bin 2), pred 0, label 0: correct
        [0.0, 0.0, 0.0, 0.0, 0.0],  # conf 0 (bin 1), pred 0, label 1: wrong
        [0.25, 0.2, 0.2, 0.2, 0.15],  # conf .25 (bin 1), pred 0, label 0: correct
    ]).T.reshape(1, 5, 1, 5)  # (pixels, K) -> (B=1, K, H=1, W=5)
    label = torch.tensor([[[1, 1, 0, 1, 0]]])
    got = run_seg([(probs, label, torch.zeros(1, 1, 5))], num_bins=4).compute()
    # bins 1, 2, 3: |1 - .25| + |1 - .9| + |0 - .75|, over 5 pixels
    assert got['ece'] == pytest.approx(1.6 / 5, abs=1e-7)
    assert got['ece'] == pytest.approx(seg_reference(probs, label, torch.zeros(1, 1, 5), K, 4)['ece'], abs=1e-12)


def test_zero_depth_prediction_is_inaccurate():
    mean = torch.tensor([[[0.0, 2.0, 0.0, 1.0]]])
    depth = torch.tensor([[[2.0, 2.0, 0.0, math.nan]]])  # last two pixels invalid
    unc = torch.tensor([[[1.0, 0.0, 1e3, 1e3]]])  # threshold 0.5 over the valid pixels
    got = run_depth([(mean, unc, depth)]).compute()
    assert got['rmse'] == math.sqrt(2.0)  # sqrt((4 + 0) / 2)
    assert got['abs_rel'] == 0.5
    assert got['delta1'] == got['delta2'] == got['delta3'] == 0.5
    assert got['p_accurate_certain'] == got['p_uncertain_inaccurate'] == got['pavpu'] == 1.0


def test_delta_edges_are_exclusive():
    # delta = 1.25, 1.25 (y/mu side), 1.25^2, 1.25^3, 1, all exact in binary: "< 1.25^i" is strict
    mean = torch.tensor([[[1.25, 1.0, 1.5625, 1.953125, 1.0]]])
    depth = torch.tensor([[[1.0, 1.25, 1.0, 1.0, 1.0]]])
    got = run_depth([(mean, torch.ones(1, 1, 5), depth)]).compute()  # all certain
    assert (got['delta1'], got['delta2'], got['delta3']) == (1 / 5, 3 / 5, 4 / 5)
    assert got['p_accurate_certain'] == 1 / 5  # accurate iff delta < 1.25 (Eq. 13)


def test_uncertainty_equal_to_threshold_is_certain():
    depth = torch.ones(1, 1, 3)
    got = run_depth([(depth, torch.tensor([[[0.0, 1.0, 2.0]]]), depth)]).compute()  # all accurate
    assert got['p_accurate_certain'] == 1.0
    assert got['pavpu'] == 2 / 3  # n_ac = 2 (u = 0 and u = 1 = mean), n_au = 1
    assert math.isnan(got['p_uncertain_inaccurate'])


# ---- streaming and DDP ----

UNEVEN = (1, 2, 1, 3, 1, 1, 1)  # 7 batches, N = 10 images


def test_streaming_is_independent_of_batching():
    seg, depth = random_data()
    for make, data in ((run_seg, seg), (run_depth, depth)):
        whole = make([data])
        for split in (batches(data, UNEVEN), batches(data, UNEVEN)[::-1]):
            parts = make(split)
            for name, total in whole.stats.items():
                if total.dtype == torch.int64:
                    assert torch.equal(parts.stats[name], total), name
                else:
                    torch.testing.assert_close(parts.stats[name], total, rtol=1e-12, atol=1e-12)
            assert_close(parts.compute(), whole.compute())


def test_reduce_without_distributed_is_a_no_op():
    seg, depth = random_data()
    for m in (run_seg([seg]), run_depth([depth])):
        before = m.compute()
        m.reduce()
        assert_close(m.compute(), before, tol=0)


def _ddp_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    seg, depth = random_data()
    half = slice(0, 4) if rank == 0 else slice(4, N)  # uneven halves, 2 batches each
    sizes = (1, 3) if rank == 0 else (2, 4)
    seg_m = run_seg(batches(tuple(t[half] for t in seg), sizes))
    depth_m = run_depth(batches(tuple(t[half] for t in depth), sizes))
    scores, ood = ood_data()
    ood_m = metrics.OODMetrics(K)
    ood_m.update({k: v[[0, 2][rank:rank + 1]] for k, v in scores.items()}, ood[[0, 2][rank:rank + 1]])
    if rank == 0:
        ood_m.update({k: v[1:2] for k, v in scores.items()}, ood[1:2])
    seg_m.reduce()
    depth_m.reduce()
    ood_m.reduce()
    with open(f'{out_dir}/rank{rank}.json', 'w') as f:
        json.dump({'seg': seg_m.compute(), 'depth': depth_m.compute(), 'ood': ood_m.compute()}, f)
    dist.destroy_process_group()


def test_reduce_across_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    seg, depth = random_data()
    want = {'seg': run_seg([seg]).compute(), 'depth': run_depth([depth]).compute()}
    scores, ood = ood_data()
    whole = metrics.OODMetrics(K)
    whole.update(scores, ood)
    want_ood = whole.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert_close(got['seg'], want['seg'])
        assert_close(got['depth'], want['depth'])
        for name in scores:  # images 0 and 1 on rank 0, image 2 on rank 1: the counts add up exactly
            assert_close(got['ood'][name], want_ood[name], tol=0)


# ---- the histogram of the ranking metrics ----

def test_failure_detection_is_within_its_stated_bound_of_the_exact_value():
    # continuous entropies: a bin may hold several distinct scores, whose order within it the
    # histogram forgets; the exact metrics (brute force on the scores themselves) must lie
    # within the bound each metric reports, and the bound must be small
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 5, 40, 50)) * rng.uniform(0.5, 3, size=(4, 1, 1, 1))
    probs = torch.from_numpy(logits).softmax(1).float()
    entropy = -(probs * probs.log()).sum(1)
    label = torch.where(torch.rand(4, 40, 50) < 0.5, probs.argmax(1), torch.randint(0, 5, (4, 40, 50)))
    got = run_seg([(probs, label, entropy)]).compute()
    errors = (probs.argmax(1) != label).flatten().numpy()
    u = entropy.flatten().double().numpy()
    exact = {'auroc_failure': bf.auroc(u, errors), 'aupr_failure': bf.aupr(u, errors),
             'aurc': bf.aurc(u, errors), 'augrc': bf.augrc(u, errors),
             'risk_at_80': bf.risk_at_coverage(u, errors), 'coverage_at_5': bf.coverage_at_risk(u, errors)}
    for name, value in exact.items():
        assert abs(got[name] - value) <= got[f'{name}_bound'] + 1e-12, name
        assert got[f'{name}_bound'] < 1e-3, name  # 65536 bins for 8000 pixels: few share one


def test_nll_of_a_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).T.reshape(1, 2, 1, 2)  # pixel 0: q_y = 0 for y = 1
    got = run_seg([(probs, torch.tensor([[[1, 0]]]), torch.zeros(1, 1, 2))], num_classes=2).compute()
    tiny = torch.finfo(torch.float32).tiny
    assert got['nll'] == pytest.approx((-math.log(tiny) - math.log(0.5)) / 2)
    assert got['brier'] == pytest.approx((2 + 0.5) / 2)  # (1 - 0)^2 + (0 - 1)^2, then 2 * 0.25


# ---- out-of-distribution detection ----

def ood_data(seed=0):
    """Scores of three kinds on 3 images, OOD pixels scoring higher on average."""
    rng = np.random.default_rng(seed)
    ood = rng.random((3, H, W)) < 0.2
    entropy = rng.uniform(0, 1, (3, H, W)) + 0.5 * ood
    mutual = rng.uniform(0, 0.3, (3, H, W)) * (1 + ood)
    variance = np.exp(rng.normal(0, 1, (3, H, W)) + 1.5 * ood)
    t = lambda a: torch.from_numpy(a.astype(np.float32))
    return {'entropy': t(entropy), 'mutual_information': t(mutual), 'depth_var': t(variance)}, torch.from_numpy(ood)


def ood_reference(scores, ood, num_classes=K):
    """Brute force on the scores tied within the histogram's bins (log-spaced for the variance)."""
    top = math.log(num_classes)
    bin_of = {'entropy': lambda s: histogram_bin(s, top), 'mutual_information': lambda s: histogram_bin(s, top),
              'depth_var': lambda s: histogram_bin(math.log(s) - math.log(1e-6), math.log(1e6) - math.log(1e-6))}
    positives = ood.flatten().numpy()
    out = {}
    for name, score in scores.items():
        bins = np.array([bin_of[name](float(s)) for s in score.flatten()], dtype=np.float64)
        out[name] = {'auroc': bf.auroc(bins, positives), 'aupr': bf.aupr(bins, positives),
                     'fpr95': bf.fpr_at_95_tpr(bins, positives)}
    return out


def test_ood_metrics_match_the_reference_in_any_batches():
    scores, ood = ood_data()
    want = ood_reference(scores, ood)
    for sizes in ((3,), (1, 2), (2, 1)):
        ood_m = metrics.OODMetrics(K)
        for start, n in zip(np.cumsum((0, *sizes[:-1])), sizes):
            ood_m.update({k: v[start:start + n] for k, v in scores.items()}, ood[start:start + n])
        got = ood_m.compute()
        for name in scores:
            assert got[name]['ood_pixels'] == int(ood.sum()) and got[name]['pixels'] == ood.numel()
            for m in ('auroc', 'aupr', 'fpr95'):
                assert got[name][m] == pytest.approx(want[name][m], abs=1e-12), (name, m)
    # a score the model lacks is None, and the exact (unbinned) values lie within each bound
    ood_m = metrics.OODMetrics(K)
    ood_m.update({'entropy': scores['entropy'], 'mutual_information': None, 'depth_var': None}, ood)
    got = ood_m.compute()
    assert got['mutual_information'] is None and got['depth_var'] is None
    exact = bf.auroc(scores['entropy'].flatten().double().numpy(), ood.flatten().numpy())
    assert abs(got['entropy']['auroc'] - exact) <= got['entropy']['auroc_bound'] + 1e-12


def test_the_metrics_make_their_tensors_on_the_inputs_device():
    # The first GPU run failed here: a tensor made without device= lands on the default device
    # (the CPU), beside CUDA inputs. The same mistake shows on a CPU with the default device set to
    # 'meta': such a tensor is then a meta tensor beside the CPU inputs, and the op raises.
    seg, depth = random_data()
    scores, ood = ood_data()
    with torch.device('meta'):
        seg_m, depth_m, ood_m = (metrics.SegMetrics(K, 15, device='cpu'), metrics.DepthMetrics(device='cpu'),
                                 metrics.OODMetrics(K, device='cpu'))
        seg_m.update(*seg)
        depth_m.update(*depth)
        ood_m.update(scores, ood)
        got = {'seg': seg_m.compute(), 'depth': depth_m.compute()}
    assert_close(got['seg'], run_seg([seg]).compute())
    assert_close(got['depth'], run_depth([depth]).compute())


def test_rss_is_zero_or_nan_where_a_part_is():
    seg = {'miou': 0.5, 'ece': 0.1, 'p_accurate_certain': 0.8, 'p_uncertain_inaccurate': 0.4}
    assert metrics.rss(seg) == pytest.approx(4 / (1 / 0.5 + 1 / 0.9 + 1 / 0.8 + 1 / 0.4), rel=1e-15)
    assert metrics.rss({**seg, 'p_uncertain_inaccurate': 0.0}) == 0.0
    assert math.isnan(metrics.rss({**seg, 'miou': float('nan')}))


def test_operating_points_on_a_curve_written_out():
    # 10 pixels, uncertainty 0..9, errors at 2 and 7 and 8 (each value its own point):
    # accepted k most certain: risks 0,0,1/3,1/4,1/5,1/6,1/7,2/8,3/9,3/10
    u = np.arange(10.0)
    errors = np.isin(u, [2, 7, 8])
    assert bf.risk_at_coverage(u, errors, 0.8) == pytest.approx(2 / 8, abs=1e-15)
    # risk <= 5% up to coverage 0.2, then rising to 1/3 at 0.3: crossing at 0.2 + 0.1 * 0.05 / (1/3)
    assert bf.coverage_at_risk(u, errors, 0.05) == pytest.approx(0.2 + 0.1 * 0.05 * 3, abs=1e-15)
    errors_ = np.stack([errors, ~errors]).astype(np.int64)  # one pixel per group, in the implementation's form
    got = metrics._risk_coverage(errors_[0], errors_[1])
    assert got['risk_at_80'] == pytest.approx(2 / 8, abs=1e-15)
    assert got['coverage_at_5'] == pytest.approx(0.2 + 0.1 * 0.05 * 3, abs=1e-15)


def test_the_depth_interval_counts_the_pixels_inside_and_the_widths():
    mean = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    variance = torch.tensor([[[0.25, 1.0, 4.0, 0.01]]])  # sigma 0.5, 1, 2, 0.1
    depth = torch.tensor([[[1.6, 2.5, 0.0, 4.05]]])  # the third pixel has no ground truth
    dep = metrics.DepthMetrics(interval_scale=1.5)  # half-widths 0.75, 1.5, (3), 0.15
    dep.update(mean, variance, depth)
    got = dep.compute()
    assert got['interval_coverage'] == pytest.approx(3 / 3) and got['interval_width'] == pytest.approx((1.5 + 3 + 0.3) / 3)
    dep = metrics.DepthMetrics(interval_scale=1.0)  # 0.6 > 0.5: the first pixel is outside
    dep.update(mean, variance, depth)
    assert dep.compute()['interval_coverage'] == pytest.approx(2 / 3)
