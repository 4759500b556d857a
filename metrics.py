"""The metrics of this codebase, in one place: I-AUROC, P-AUROC, AUPRO and best F1 (numpy, scikit-learn, scipy).

Stage 3's label-free validation (holdout normal images with pseudo anomalies) and evaluate.py (the test split)
score with the same functions; this module imports nothing of the project, so neither imports the other. Every
metric needs both classes: with one missing it is not defined and returns nan (null in metrics.json).
"""
import math

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _both(y):
    return 0 < int(np.count_nonzero(y)) < y.size


def _flat(arrays, dtype=None):
    """(M, H, W) array, or a list of (H_i, W_i) arrays (images of several sizes) -> one flat array."""
    if isinstance(arrays, np.ndarray):
        return arrays.ravel() if dtype is None else arrays.astype(dtype, copy=False).ravel()
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays]) if len(arrays) else np.zeros(0, dtype)


def image_auroc(labels, scores):
    """Image-level AUROC. labels (M,) {0,1}, scores (M,) -> float in [0, 1], nan with one class only."""
    y, s = np.asarray(labels).ravel() > 0, np.asarray(scores, dtype=np.float64).ravel()
    return float(roc_auc_score(y, s)) if _both(y) else math.nan


def pixel_auroc(masks, maps):
    """Pixel-level AUROC over all pixels. masks (M, H, W) binarised at > 0, maps (M, H, W); or lists of (H_i, W_i)
    arrays."""
    y, s = _flat(masks) > 0, _flat(maps, np.float32)
    return float(roc_auc_score(y, s)) if _both(y) else math.nan


def best_f1(labels, scores):
    """The best F1 over all thresholds and that threshold (anomalous when score >= it); (nan, nan) with one class."""
    y, s = np.asarray(labels).ravel() > 0, np.asarray(scores, dtype=np.float64).ravel()
    if not _both(y):
        return math.nan, math.nan
    p, r, t = precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]  # the last point (recall 0) has no threshold
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(t[i])


def aupro(masks, maps, fpr_limit=0.3):
    """Area under the per-region-overlap curve up to FPR `fpr_limit`, normalised by it: exact, in [0, 1].

    Every distinct score t is a threshold (a pixel is positive when its score >= t). Regions are the 8-connected
    components of each ground-truth mask. FPR(t) is the fraction of normal pixels (of all images) at or above t;
    PRO(t) the mean over all regions of the fraction of the region at or above t. The curve runs from (0, 0)
    through every threshold to (1, 1); it is integrated with the trapezoid rule up to FPR = fpr_limit
    (interpolated there) and divided by fpr_limit. masks (M, H, W) binarised at > 0, maps (M, H, W), or lists of
    per-image (H_i, W_i) arrays; nan when there is no region or no normal pixel. (Older anomalib versions averaged
    resampled curves and could exceed 1.)

    One sort of all pixels replaces the threshold loop: a pixel of region r adds 1 / (R |r|) to PRO once the
    threshold passes its score, so PRO and FPR are cumulative sums in descending score order."""
    shapes = [(np.shape(a), np.shape(b)) for a, b in zip(masks, maps)]
    if len(masks) != len(maps) or any(a != b or len(a) != 2 for a, b in shapes):
        raise ValueError(f"aupro: masks and maps must both be (M, H, W) or lists of equal (H_i, W_i), got {shapes[:3]}")
    regions, n_regions = [], 0  # 0 = normal pixel, 1..R = region id over all images
    for m in masks:
        lab, n = ndimage.label(np.asarray(m) > 0, structure=np.ones((3, 3), int))  # 8-connectivity
        regions.append(np.where(lab > 0, lab + n_regions, 0).ravel())
        n_regions += n
    region = np.concatenate(regions) if regions else np.zeros(0, np.int64)
    maps = _flat(maps)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    size = np.bincount(region, minlength=n_regions + 1)  # (R + 1,) pixels per region, [0] = normal
    n_normal = int(size[0])
    if n_regions == 0 or n_normal == 0:
        return math.nan
    gain = np.r_[0.0, 1.0 / (n_regions * size[1:])]  # (R + 1,) PRO gained per pixel of each region
    order = np.argsort(maps, kind="stable")[::-1]  # descending score
    s, ids = maps[order], region[order]
    del order, region
    fpr = np.cumsum(ids == 0, dtype=np.int64)
    pro = np.cumsum(gain[ids])
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last pixel of each distinct score: a threshold
    fpr = np.r_[0.0, fpr[last] / n_normal]
    pro = np.r_[0.0, np.minimum(pro[last], 1.0)]  # (T + 1,) the curve from (0, 0)
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit: [0, k)
    x, y = fpr[:k], pro[:k]
    if k < len(fpr) and x[-1] < fpr_limit:  # interpolate the curve at exactly fpr_limit
        f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        x, y = np.r_[x, fpr_limit], np.r_[y, p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return min(1.0, area / fpr_limit)
