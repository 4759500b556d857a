"""Evaluate RcAE (and the FAIR baseline) on the test split: I-AUROC, P-AUROC, AUPRO, speed, memory.

The only code that reads the test split. It finds the checkpoints in <out> and
evaluates every variant they allow, which is the paper's Table 2 ablation from one command:

    rcae       map |I - I_R^N| (mean over channels), score top-k mean                            stage 1
    rcae+dpn   the same from |I - I_D^N|, the DPN-refined deepest reconstruction, Eq. (6)      stages 1-2
    crd        the CRD map M_A, Eq. (8), score top-k mean with the calibrated k                  stages 1-3
    fair       the FAIR baseline's map and image score (--method fair, baselines/fair.py)

Every RcAE variant's map is smoothed alike (Gaussian, --sigma px) before scoring; metrics.json says how.
FAIR keeps its own paper's post-processing (a 21x21 mean filter at 256 px, scaled with the image side).

Image size, depth and --resize come from the stage-1 checkpoint (FAIR: its own). Masks are optional: I-AUROC
and best F1 are over all test images, P-AUROC and AUPRO over the images whose pixel ground truth is known
(normal images, anomalous ones with a mask). They are computed on each image's metric frame: its own aspect
ratio with the long side at the model's size (metric_frame), the map taken back from the square input.
A stage missing from <out> is taken from the path its downstream checkpoint recorded (Table 6 runs).
Each variant runs only what it needs (rcae: one depth-N pass; rcae+dpn: plus DPN on that depth), and
its images/s is the time to produce the maps of the whole test split after one warm-up batch, host
transfers included. Peak memory: torch.cuda.max_memory_allocated of that pass on CUDA, the process's
peak RSS so far (ru_maxrss) elsewhere; "peak_mem_source" says which. An image is called anomalous
when its score is above the threshold (stage 3's calibration; best_f1_threshold: at or above).

GPU:          python evaluate.py --data mvtec/bottle                 # every RcAE variant trained
              python evaluate.py --data mvtec/bottle --method fair   # adds FAIR to the same metrics.json
              python evaluate.py --data mvtec                        # every category: results.md/.csv
CPU smoke:    python evaluate.py --data data/toy --device cpu --n_figures 2
Predict:      python evaluate.py --predict shots/ part.png --data mvtec/bottle [--variant rcae]
Reads:  <out>/stage1_rcae.pt, stage2_dpn.pt, stage3_crd.pt (or fair.pt) and the test split of --data.
Writes: <out>/metrics.json, <out>/scores.json (image scores, for the ROC curves), <out>/figures/*.png;
        for a folder of categories results.md and results.csv in runs/<root> (or --out);
        for --predict a new folder <out>/predictions/<YYYYmmdd-HHMMSS>_<variant>/ with one overlay per image
        (its own size, colour bar, score and threshold in the title) and predictions.csv (path, width,
        height, variant, score, threshold, decision, overlay). Each variant's threshold is the same quantile
        of the holdout normal scores: stage 3 stores crd's; rcae and rcae+dpn's are computed at predict time.

metrics.json, schema 1 (a metric is null when not defined: one class missing from the test split, or no
anomalous image with a mask for the pixel metrics):
    {"schema": 1, "data": str, "category": str, "device": str, "image_size": int, "resize": str,
     "depth": int|null, "n_images": int, "n_anomalous": int, "n_pixel_images": int (those with pixel ground
     truth), "n_pixel_anomalous": int, "params": {stage: int}, "peak_mem_source": str,
     "variants": {name: {"method": "rcae"|"fair", "i_auroc", "p_auroc", "aupro": float|null in [0, 1],
                         "best_f1": float|null, "best_f1_threshold": float|null, "images_per_s": float,
                         "peak_mem_mb": float|null, "params": int (all stages it uses), "image_size": int,
                         "n_images", "n_anomalous", "n_pixel_images", "n_pixel_anomalous": int,
                         "per_defect": {kind: {"n_images": int, "i_auroc", "p_auroc", "aupro": float|null}}:
                         each defect kind (test folder) against all normal images; {} with one kind}},
     "calibrated_threshold": null | {"variant": "crd", "image_threshold", "topk_frac", "quantile",
                                     "tpr", "fpr", "f1": the test split judged at that threshold}}
Running one --method replaces that method's variants and keeps the other's.
"""
import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_curve
from tqdm import tqdm

import common
import stage3_crd
from common import UserError
from metrics import aupro, best_f1, image_auroc, pixel_auroc

RCAE_VARIANTS = ("rcae", "rcae+dpn", "crd")
CKPT = {"stage1_rcae": "stage1_rcae.pt", "stage2_dpn": "stage2_dpn.pt", "stage3_crd": "stage3_crd.pt",
        "fair": "fair.pt"}
HOW = {"stage1_rcae": "python stage1_rcae.py --data {data}", "stage2_dpn": "python stage2_dpn.py --data {data}",
       "stage3_crd": "python stage3_crd.py --data {data}", "fair": "python -m baselines.fair --data {data}"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="a category (mvtec/bottle) or a folder of categories (mvtec)")
    g.add_argument("--out", default=None, help="checkpoint and output folder (default: runs/<parent>/<category>); "
                                               "for a folder of categories, the results folder holding <category>/")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["rcae", "fair"], default="rcae",
                   help="rcae: every RcAE variant whose checkpoints exist; fair: the FAIR baseline")
    g.add_argument("--sigma", type=float, default=4.0,
                   help="Gaussian sigma (px) smoothing the maps of every variant alike, 0 = off (paper: not given); "
                        "metrics.json records it")
    g.add_argument("--topk_frac", type=float, default=None,
                   help="image score of rcae and rcae+dpn = mean of this top fraction of map pixels (paper: k "
                        "not given); default: stage 3's value, 0.01 without stage 3. crd always uses stage 3's")
    g = p.add_argument_group("runtime / io")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--batch_size", type=int, default=8, help="test images per forward pass")
    g.add_argument("--n_figures", type=int, default=4, help="figure panels of this many normal and anomalous images")
    g.add_argument("--predict", nargs="+", default=None, metavar="IMG",
                   help="score these image files/folders (any size) instead of evaluating: overlays and a csv "
                        "in a new folder <out>/predictions/<time>_<variant>")
    g.add_argument("--variant", choices=RCAE_VARIANTS, default="crd",
                   help="--predict: the map and image threshold to use; crd = the full detector (stages 1-3)")
    args = p.parse_args(argv)
    if args.data is None and (args.predict is None or args.out is None):
        raise UserError("pass --data (a category or a folder of categories), or --predict IMG with --out")
    common.check_flags(args, sigma=">=0", topk_frac="(0,1]", batch_size=">=1", n_figures=">=0")
    return args


# ----------------------------------------------------------------------------- the test split


def read_mask(path, size, resize="squash"):
    """Mask file -> bool binarised at > 0, nearest: (size, size) by `resize`, or (h, w) for size=(h, w)."""
    with Image.open(path) as im:
        im.load()
        a = np.asarray(im.convert("L") if im.mode not in ("I", "I;16", "F", "L") else im)
        m = Image.fromarray((a > 0).astype(np.uint8) * 255)
        m = m.resize(size[::-1], Image.NEAREST) if isinstance(size, tuple) else common.fit(m, size, resize,
                                                                                            Image.NEAREST)
        return np.asarray(m) > 0


@dataclass
class Split:
    images: torch.Tensor  # (M, 3, H, W) uint8, the model input (--resize)
    masks: torch.Tensor  # (M, 1, H, W) bool, the same geometry; all False for normal images and missing masks
    labels: torch.Tensor  # (M,) int64
    samples: list  # the common.Sample of each row
    sizes: list  # (height, width) of each original image
    resize: str = "squash"

    def __len__(self):
        return len(self.samples)

    @property
    def has_mask(self):
        """(M,) bool: the pixel ground truth is known (normal images, anomalous ones with a mask file)."""
        return torch.tensor([s.label == 0 or s.mask is not None for s in self.samples], dtype=torch.bool)


def read_test(sample, size, resize):
    mask = read_mask(sample.mask, size, resize) if sample.mask else np.zeros((size, size), bool)
    return common.read_image(sample.path, size, resize), mask


def load_test(data, image_size, resize="squash"):
    """The test split of a category, decoded into memory (the only code that reads it)."""
    samples, out, sizes = common.decode(common.list_samples(data, "test"), read_test, image_size, resize)
    images = torch.from_numpy(np.stack([img for img, _ in out])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([m for _, m in out]))[:, None]
    return Split(images, masks, torch.tensor([s.label for s in samples]), list(samples), list(sizes), resize)


def metric_frame(h, w, size):
    """The grid an (h, w) image's map is evaluated on: its own aspect ratio, the long side `size` px."""
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def map_to_image(m, hw, size, resize, out_hw):
    """A map of the model input back onto the image: (B, 1, size, size) -> (B, 1, *out_hw), the inverse of
    `resize` for an original of hw = (h, w). Pixels that crop never showed the model get 0."""
    rh, rw, top, left = common.placement(*hw, size, resize)
    canvas = m.new_zeros(*m.shape[:2], rh, rw)  # (B, 1, rh, rw): the resized image
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(size, top + rh), min(size, left + rw)
    canvas[..., y0 - top:y1 - top, x0 - left:x1 - left] = m[..., y0:y1, x0:x1]
    if (rh, rw) == tuple(out_hw):
        return canvas
    return F.interpolate(canvas, size=tuple(out_hw), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- models


def load_stages(out, data, method):
    """The frozen stages for `out`: {stage: (model, ck)} in pipeline order, only those trained (RcAE:
    stage3_crd.load_chain, the one chain loader with its checks). A missing first stage is a UserError
    naming the command that makes it."""
    out = Path(out)
    if method == "fair":
        if not (out / CKPT["fair"]).is_file():
            raise UserError(f"no {CKPT['fair']} in {out}: run `{HOW['fair'].format(data=data or 'PATH')}` first "
                            f"(or point --out at the folder that holds it)")
        from baselines.fair import load_fair  # only FAIR runs need the baseline's code
        return {"fair": load_fair(str(out / CKPT["fair"]))}
    st = stage3_crd.load_chain(out, data=data)
    if "stage3_crd" in st and "calibration" not in st["stage3_crd"][1]:  # written when stage 3 ends
        common.warn(f"the stage3_crd.pt of {out} has no calibration yet: no image threshold")
    return st


def gaussian_blur(m, sigma):
    """Separable Gaussian truncated at 4 sigma, mirror padding: (B, 1, H, W) -> (B, 1, H, W)."""
    if sigma <= 0:
        return m
    r = max(1, min(int(4 * sigma + 0.5), m.shape[-1] - 1, m.shape[-2] - 1))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=m.device, dtype=m.dtype) / sigma) ** 2)
    k = k / k.sum()
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))  # along W
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))  # along H


def residual_map(x, recon, sigma):
    """|I - recon| averaged over channels, smoothed: (B, C, H, W), (B, C, H, W) -> (B, 1, H, W)."""
    return gaussian_blur((x - recon).abs().mean(1, keepdim=True), sigma)


def calibration(st):
    """Stage 3's holdout calibration {topk_frac, quantile, image_threshold, ...}; {} without stage 3."""
    if "stage3_crd" not in st:
        return {}
    ck = st["stage3_crd"][1]
    return {"topk_frac": ck["args"]["topk_frac"], "quantile": None, "image_threshold": None,
            **ck.get("calibration", {})}


def topk_frac_of(st, flag):
    """Top-k fraction of the rcae variants: the flag, else stage 3's calibrated value, else 0.01."""
    return flag if flag is not None else calibration(st).get("topk_frac", 0.01)


def variant_fns(st, sigma, topk_frac):
    """{variant: fn(x (B, C, H, W) on the device) -> (map (B, 1, H, W), image score (B,))} for the stages."""
    if "fair" in st:
        from baselines.fair import fair_maps
        model, ck = st["fair"]
        return {"fair": lambda x: fair_maps(model, ck, x)}

    def scored(m, frac=topk_frac):
        return m, stage3_crd.topk_mean(m, frac)  # (B, 1, H, W), (B,)

    rcae = st["stage1_rcae"][0]
    fns = {"rcae": lambda x: scored(residual_map(x, rcae(x), sigma))}  # I_R^N
    if "stage2_dpn" in st:
        dpn = st["stage2_dpn"][0]
        fns["rcae+dpn"] = lambda x: scored(residual_map(x, dpn.refine(rcae(x)[:, None], x)[:, 0], sigma))  # I_D^N
    if "stage3_crd" in st:  # always stage 3's own k, the one its threshold was calibrated with
        det = stage3_crd.detector_of(st)
        fns["crd"] = lambda x: scored(gaussian_blur(det(x)["map"], sigma), det.topk_frac)  # Eq. (8): M_A, smoothed alike
    return fns


def variant_stages(name):
    return {"rcae": ["stage1_rcae"], "rcae+dpn": ["stage1_rcae", "stage2_dpn"],
            "crd": ["stage1_rcae", "stage2_dpn", "stage3_crd"], "fair": ["fair"]}[name]


# ----------------------------------------------------------------------------- inference


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    except ImportError:  # Windows
        return None


def peak_mem_source(device):
    return ("torch.cuda.max_memory_allocated during the variant's pass" if device.type == "cuda"
            else "process peak RSS so far (ru_maxrss), not per variant")


@torch.inference_mode()
def run_variant(fn, images, device, batch_size, name):
    """Maps and scores of every image, timed after one warm-up batch.

    images (M, C, H, W) uint8 -> (maps (M, H, W) float32 numpy, scores (M,) numpy, seconds, peak MiB)."""
    fn(common.to_float(images[:batch_size]).to(device))  # warm-up: cudnn autotune, lazy init
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    maps, scores = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(images), batch_size), desc=name, unit="batch", dynamic_ncols=True, disable=None):
        m, s = fn(common.to_float(images[i:i + batch_size]).to(device))  # (B, 1, H, W), (B,)
        maps.append(m.float()[:, 0].cpu())
        scores.append(s.float().cpu())
    _sync(device)
    seconds = time.perf_counter() - t0
    return torch.cat(maps).numpy(), torch.cat(scores).numpy(), seconds, peak_mem_mb(device)


def match_masks(masks, shape, note):
    """Ground truth (M, H, W) bool resized (nearest) to the maps' (H', W') if they differ; `note` prints once."""
    if masks.shape[-2:] == tuple(shape):
        return masks
    if not note:
        print(f"note: masks are {masks.shape[-2]}x{masks.shape[-1]}, maps {shape[0]}x{shape[1]}: "
              f"masks resized (nearest) to the maps")
        note.append(True)
    m = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=tuple(shape), mode="nearest")  # (M, 1, H', W')
    return m[:, 0].numpy() > 0.5


def metrics_of(labels, masks, maps, scores):
    """Image metrics over all images; pixel metrics over `masks` and `maps`, the images with ground truth."""
    f1, thr = best_f1(labels, scores)
    return {"i_auroc": image_auroc(labels, scores), "p_auroc": pixel_auroc(masks, maps),
            "aupro": aupro(masks, maps), "best_f1": f1, "best_f1_threshold": thr}


def per_defect(defects, labels, pix, masks, maps, scores):
    """Each defect kind against the normal images: {kind: {"n_images", "i_auroc", "p_auroc", "aupro"}}, {} with
    fewer than two kinds (the whole split says it). defects (M,) kind names, labels (M,), scores (M,); masks and
    maps hold the images `pix` (those with pixel ground truth), as metrics_of takes them."""
    defects, labels = np.asarray(defects), np.asarray(labels)
    kinds = sorted(set(defects[labels == 1]))
    if len(kinds) < 2:
        return {}
    out = {}
    for kind in kinds:
        keep = (defects == kind) | (labels == 0)  # (M,) this kind and every normal image
        sel = np.flatnonzero(keep[pix])  # positions in masks / maps
        pick = (lambda a: a[sel]) if isinstance(masks, np.ndarray) else (lambda a: [a[j] for j in sel])
        out[kind] = {"n_images": int((defects == kind).sum()), "i_auroc": image_auroc(labels[keep], scores[keep]),
                     "p_auroc": pixel_auroc(pick(masks), pick(maps)), "aupro": aupro(pick(masks), pick(maps))}
    return out


def resize_of(st):
    """How the stages turned images into squares: stage 1's --resize."""
    ck = next(iter(st.values()))[1]
    return ck["args"]["resize"]


def on_frames(split, size, maps, idx):
    """The maps of images `idx` on their metric frames (metric_frame: the image's aspect ratio, long
    side `size`), with the ground truth read on the same frames: (masks, maps), each (K, h, w) arrays when
    the frames agree, else lists. Square images need no change: the frame is the model input."""
    frames = [metric_frame(*split.sizes[i], size) for i in idx]
    if all(f == (size, size) for f in frames):
        return split.masks[torch.as_tensor(idx, dtype=torch.long), 0].numpy(), maps[idx]
    masks, out = [], []
    for i, f in zip(idx, frames):
        s = split.samples[i]
        masks.append(read_mask(s.mask, f) if s.mask else np.zeros(f, bool))  # (h, w)
        m = torch.from_numpy(maps[i])[None, None]  # (1, 1, size, size)
        out.append(map_to_image(m, split.sizes[i], size, split.resize, f)[0, 0].numpy())  # (h, w)
    if len(set(frames)) == 1:
        return np.stack(masks), np.stack(out)
    return masks, out


# ----------------------------------------------------------------------------- one category


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def image_size_of(st):
    ck = next(iter(st.values()))[1]
    return ck["model_config"].get("image_size") or ck["args"]["image_size"]


def evaluate_category(data, out, args):
    """Evaluate every variant the checkpoints in `out` allow on the test split of `data`; returns metrics."""
    out = Path(out)
    st = load_stages(out, data, args.method)
    device = common.get_device(args.device)
    for model, _ in st.values():
        model.to(device)
    size = image_size_of(st)
    depth = st["stage1_rcae"][1]["model_config"]["depth"] if "stage1_rcae" in st else None
    split = load_test(str(data), size, resize_of(st))
    labels = split.labels.numpy()  # (M,)
    defects = [smp.defect for smp in split.samples]  # (M,) "good" or the defect kind (its test folder)
    pix = np.flatnonzero(split.has_mask.numpy())  # the images whose pixel ground truth is known
    n_anom, n_pix_anom = int(labels.sum()), int(labels[pix].sum())
    counts = {"n_images": len(labels), "n_anomalous": n_anom, "n_pixel_images": len(pix),
              "n_pixel_anomalous": n_pix_anom}
    print(f"evaluate: {data}: {len(labels)} test images ({n_anom} anomalous, {n_pix_anom} of them with a mask) "
          f"at {size}px on {device}, stages {', '.join(st)}")
    if n_anom in (0, len(labels)):
        common.warn(f"the test split of {data} has only {'normal' if n_anom == 0 else 'anomalous'} images: "
                    f"AUROC, AUPRO and best F1 need both kinds and are not defined (null)")
    elif n_pix_anom == 0:
        common.warn(f"no anomalous test image of {data} has a mask: P-AUROC and AUPRO are not defined (null); "
                    f"I-AUROC and best F1 are over all {len(labels)} images")
    elif n_pix_anom < n_anom:
        common.warn(f"{n_anom - n_pix_anom} of {n_anom} anomalous test images of {data} have no mask: P-AUROC and "
                    f"AUPRO are over the {len(pix)} images with pixel ground truth, I-AUROC over all {len(labels)}")
    topk = topk_frac_of(st, args.topk_frac)
    params = {name: common.n_params(model) for name, (model, _) in st.items()}
    variants, scores, fig_idx, fig_maps, note = {}, {}, figure_indices(labels, args.n_figures), {}, []
    for name, fn in variant_fns(st, args.sigma, topk).items():
        maps, s, seconds, mem = run_variant(fn, split.images, device, args.batch_size, name)
        gt, m = on_frames(split, maps.shape[-1], maps, pix)
        if isinstance(gt, np.ndarray):
            gt = match_masks(gt, m.shape[-2:], note)
        variants[name] = {"method": args.method, **metrics_of(labels, gt, m, s),
                          "images_per_s": len(labels) / seconds, "peak_mem_mb": mem,
                          "params": sum(params[k] for k in variant_stages(name)), "image_size": size, **counts,
                          "per_defect": per_defect(defects, labels, pix, gt, m, s)}
        scores[name] = s.tolist()
        fig_maps[name] = (maps[fig_idx], float(maps.max()))
    calib = None
    cal = calibration(st)
    if cal.get("image_threshold") is not None:
        pred = np.asarray(scores["crd"]) > cal["image_threshold"]  # stage 3: anomalous above the threshold
        tp, fp = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum())
        calib = {"variant": "crd", **{k: cal[k] for k in ("image_threshold", "topk_frac", "quantile")},
                 "tpr": tp / n_anom if n_anom else math.nan,
                 "fpr": fp / (len(labels) - n_anom) if n_anom < len(labels) else math.nan,
                 "f1": 2 * tp / (pred.sum() + n_anom) if n_anom else math.nan}

    old = _read_json(out / "metrics.json") or {}
    if old.get("schema") != 1 or Path(old.get("data", "")).resolve() != Path(data).resolve():
        old = {}
    keep = {k: v for k, v in old.get("variants", {}).items() if v.get("method") != args.method}
    res = {"schema": 1, "data": str(data), "category": Path(data).name, "device": str(device),
           "image_size": size, "resize": split.resize, "depth": depth, **counts,
           "params": {**old.get("params", {}), **params}, "peak_mem_source": peak_mem_source(device),
           "post_processing": {"gaussian_sigma": args.sigma, "applied_to": "every variant's map"},
           "variants": {**keep, **variants},
           "calibrated_threshold": calib if args.method == "rcae" else old.get("calibrated_threshold")}
    if args.method == "fair" and "image_size" in old:  # the top-level size and depth describe RcAE
        res["image_size"], res["depth"] = old["image_size"], old["depth"]
    common.write_json(out / "metrics.json", res)  # makes `out`
    paths = [s.path for s in split.samples]
    old_scores = _read_json(out / "scores.json") or {}
    same = old_scores.get("paths") == paths  # the other method's scores only if they rank the same images
    kept = {k: v for k, v in old_scores.get("scores", {}).items() if k in keep and same}
    common.write_json(out / "scores.json", {"paths": paths, "labels": labels.tolist(), "scores": {**kept, **scores}})
    figures(out / "figures", st, split, fig_idx, fig_maps, device, args.method)
    roc_figure(out / "figures" / "roc.png", labels, {**kept, **scores})
    print_table(res)
    print(f"evaluate: wrote {out / 'metrics.json'} and {out / 'figures'}")
    return common.json_safe(res)


def _print_rows(rows):
    """A text table: the first row is the header, the first column left-aligned, the others right."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(" | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("-+-".join("-" * x for x in w))


def print_table(res):
    rows = [("variant", "I-AUROC", "P-AUROC", "AUPRO", "img/s", "params")]
    pct = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    for name, v in res["variants"].items():
        rows.append((name, pct(v["i_auroc"]), pct(v["p_auroc"]), pct(v["aupro"]), f"{v['images_per_s']:.1f}",
                     f"{v['params']:,}"))
    _print_rows(rows)
    per = {n: v["per_defect"] for n, v in res["variants"].items() if v.get("per_defect")}
    if per:  # each defect kind against the normal images
        kinds = sorted({k for d in per.values() for k in d})
        n_of = {k: d[k]["n_images"] for d in per.values() for k in d}
        cell = lambda d: "/".join(pct(d[m]) for m in ("i_auroc", "p_auroc", "aupro")) if d else "-"  # noqa: E731
        _print_rows([("defect kind (images)", *(f"{n} I/P/AUPRO" for n in per))]
                    + [(f"{k} ({n_of[k]})", *(cell(d.get(k)) for d in per.values())) for k in kinds])
    if res.get("n_pixel_images", res["n_images"]) < res["n_images"]:
        print(f"P-AUROC and AUPRO over the {res['n_pixel_images']} of {res['n_images']} images with pixel ground "
              f"truth ({res['n_pixel_anomalous']} of {res['n_anomalous']} anomalous images have a mask)")
    if res.get("calibrated_threshold"):
        c = res["calibrated_threshold"]
        print(f"calibrated threshold {c['image_threshold']:.4g} (crd): test TPR {pct(c['tpr'])}%, FPR {pct(c['fpr'])}%")


# ----------------------------------------------------------------------------- figures


def figure_indices(labels, n):
    """Up to n normal and n anomalous test images, evenly spread over each class."""
    pick = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        if len(idx) and n > 0:
            pick += idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int)].tolist()
    return pick


@torch.inference_mode()
def figures(folder, st, split, idx, fig_maps, device, method):
    """One row per image: input, ground truth, I_R^n of every depth, I_D^N, then each variant's map."""
    if not idx:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    x = common.to_float(split.images[idx]).to(device)  # (K, C, H, W)
    tiles = [("input", x), ("ground truth", split.masks[idx][:, 0].float())]
    if "stage1_rcae" in st:
        recons = st["stage1_rcae"][0].reconstruct_all(x)  # (K, N, C, H, W)
        tiles += [(f"I_R^{n + 1}", recons[:, n]) for n in range(recons.shape[1])]
        if "stage2_dpn" in st:
            tiles.append((f"I_D^{recons.shape[1]}", st["stage2_dpn"][0].refine(recons[:, -1:], x)[:, 0]))
    for j, i in enumerate(idx):
        s = split.samples[i]
        row = [(t, v[j].cpu().clamp(0, 1).permute(1, 2, 0).numpy() if v.dim() == 4 else v[j].numpy(), None)
               for t, v in tiles]
        row += [(f"map: {name}", m[j], vmax) for name, (m, vmax) in fig_maps.items()]
        fig, axes = plt.subplots(1, len(row), figsize=(1.8 * len(row), 2.1), squeeze=False)
        for ax, (title, im, vmax) in zip(axes[0], row):
            ax.imshow(im, cmap="gray" if title == "ground truth" else "jet", vmin=0, vmax=vmax or 1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{s.defect}/{Path(s.path).name}", fontsize=8)
        fig.savefig(folder / f"{method}_{s.defect}_{Path(s.path).stem}.png", dpi=80, bbox_inches="tight")
        plt.close(fig)


def roc_figure(path, labels, scores):
    """Image-level ROC curves of every variant in one plot (skipped when a class is missing)."""
    if not 0 < labels.sum() < len(labels):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, label=f"{name} ({100 * image_auroc(labels, s):.1f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC (I-AUROC %)")
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- many categories


def is_category(folder):
    try:
        return bool(common.detect_layout(folder))
    except UserError:
        return False


def category_folders(data):
    """None when `data` is one category, else its sub-folders that are categories (any supported layout)."""
    try:
        common.detect_layout(data)
        return None
    except UserError:
        root = Path(data)
        if not root.is_dir():
            raise
        cats = [d for d in sorted(root.iterdir()) if d.is_dir() and is_category(d)]
        if not cats:
            raise
        return cats


def evaluate_root(root, cats, args):
    """Evaluate every trained category below `root`; write results.md and results.csv; returns their folder."""
    results = Path(args.out) if args.out else Path("runs") / Path(root).resolve().name
    done, skipped = {}, []
    for cat in cats:
        out = results / cat.name if args.out else Path(common.default_out(cat))
        need = ["fair"] if args.method == "fair" else ["stage1_rcae", "stage3_crd"]
        if not any((out / CKPT[k]).is_file() for k in need):
            skipped.append((cat.name, f"no {' or '.join(CKPT[k] for k in need)} in {out}"))
            continue
        try:
            done[cat.name] = evaluate_category(cat, out, args)
        except UserError as e:
            skipped.append((cat.name, str(e)))
            print(f"skipped {cat.name}: {e}")
    if not done:
        raise UserError(f"no category below {root} has checkpoints: run e.g. "
                        f"`{HOW['stage1_rcae'].format(data=cats[0])}` first")
    write_results(results, done, skipped)
    return results


def write_results(folder, done, skipped):
    """results.md (like the paper's Table 1, entries I-AUROC / P-AUROC / AUPRO in %) and results.csv."""
    names = list(dict.fromkeys(v for m in done.values() for v in m["variants"]))
    names.sort(key=lambda v: (RCAE_VARIANTS + ("fair",)).index(v) if v in RCAE_VARIANTS + ("fair",) else 99)
    keys = ("i_auroc", "p_auroc", "aupro")
    table = {cat: {v: [m["variants"].get(v, {}).get(k) for k in keys] for v in names} for cat, m in done.items()}
    mean = {v: [np.mean(x) if (x := [table[c][v][i] for c in table if table[c][v][i] is not None]) else None
                for i in range(len(keys))] for v in names}
    fmt = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["Each entry: I-AUROC / P-AUROC / AUPRO (%); '-' = not defined or not run; the Mean is over the "
             "categories that have the value.", "",
             "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for cat, row in [*table.items(), ("**Mean**", mean)]:
        lines.append(f"| {cat} | " + " | ".join(" / ".join(fmt(x) for x in row[v]) for v in names) + " |")
    partial = [(c, m) for c, m in done.items() if m.get("n_pixel_images", m["n_images"]) < m["n_images"]]
    if partial:
        lines += ["", "P-AUROC and AUPRO over the images with pixel ground truth only:",
                  *[f"- {c}: {m['n_pixel_images']} of {m['n_images']} images ({m['n_pixel_anomalous']} of "
                    f"{m['n_anomalous']} anomalous images have a mask)" for c, m in partial]]
    if skipped:
        lines += ["", "Skipped (not evaluated):", *[f"- {c}: {why}" for c, why in skipped]]
    common.write_text(folder / "results.md", "\n".join(lines) + "\n")
    with common.atomic_open(folder / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category"] + [f"{v} {k}" for v in names for k in ("I-AUROC", "P-AUROC", "AUPRO")])
        for cat, row in [*table.items(), ("Mean", mean)]:
            w.writerow([cat] + ["" if x is None else f"{x:.4f}" for v in names for x in row[v]])
    print("\n".join(lines))
    print(f"evaluate: wrote {folder / 'results.md'} and {folder / 'results.csv'}")


# ----------------------------------------------------------------------------- predict


def image_files(paths):
    """--predict arguments (files, or folders: their images, not recursive) -> image paths. A missing path, a
    folder without images or a file that is not an image is a UserError."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in common.IMAGE_EXTS)
            if not found:
                raise UserError(f"--predict {p}: no images in this folder ({', '.join(sorted(common.IMAGE_EXTS))})")
            files += found
        elif p.is_file():
            if p.suffix.lower() not in common.IMAGE_EXTS:
                raise UserError(f"--predict {p}: not an image file ({', '.join(sorted(common.IMAGE_EXTS))})")
            files.append(p)
        else:
            raise UserError(f"--predict {p}: no such file or folder")
    return files


def holdout_threshold(st, fn, variant, args, device):
    """The image threshold of `variant` and its colour scale, calibrated as stage 3 calibrates crd's: the same
    quantile (stage 3's --threshold_quantile, 0.99 without stage 3) of the scores of the holdout normal images
    (train/good kept out of all training, common.train_images(..., "holdout")). -> (threshold, map vmax)."""
    cal = calibration(st)
    if variant == "crd":
        if cal.get("image_threshold") is None:
            raise UserError("the stage3_crd.pt has no calibrated image threshold (stage 3 unfinished, or trained "
                            "without holdout images): finish `python stage3_crd.py --data PATH`")
        return float(cal["image_threshold"]), 1.0  # M_A is in [0, 1]
    ck = st["stage1_rcae"][1]
    data = args.data or ck["args"]["data"]
    hold = SimpleNamespace(data=data, image_size=image_size_of(st), holdout=ck["args"]["holdout"],
                           resize=resize_of(st))
    if not Path(data).is_dir():
        raise UserError(f"--variant {variant} calibrates its threshold on the holdout of train/good of {data}, which "
                        f"is not there: pass --data with the category the stages were trained on")
    images = common.train_images(hold, part="holdout")  # (K, 3, H, W) uint8
    if not len(images):
        raise UserError(f"--variant {variant} needs holdout images to calibrate its threshold, and stage 1 kept "
                        f"none (--holdout {hold.holdout} of train/good)")
    maps, scores, _, _ = run_variant(fn, images, device, args.batch_size, f"holdout {variant}")
    q = cal.get("quantile") or 0.99
    return float(torch.quantile(torch.from_numpy(scores).double(), q)), float(maps.max())


def overlay(path, img, m, title, vmax):
    """The image at its own resolution under its anomaly map (jet, half transparent), a colour bar, a title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, w = img.shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(max(w, 320) / dpi + 1.4, max(h, 240) / dpi + 0.7), dpi=dpi)
    ax = fig.add_axes([0.02, 0.02, 0.8, 0.86])
    ax.imshow(img)
    heat = ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.colorbar(heat, cax=fig.add_axes([0.85, 0.1, 0.03, 0.7]), label="anomaly map")
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def new_folder(parent, name):
    """A folder that did not exist: <parent>/<name>, else <name>-2, -3, ... (two calls in one second)."""
    for i in range(1, 1000):
        folder = parent / (name if i == 1 else f"{name}-{i}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise UserError(f"cannot make a new folder {parent / name} (999 exist)")


@torch.inference_mode()
def predict(args):
    """Score images with one variant and its holdout-calibrated threshold: one overlay per image, at the
    image's own size, and predictions.csv, in a new folder per call. Every input is read before anything
    is written, so bad input leaves nothing behind."""
    out = Path(args.out or common.default_out(args.data))
    files = image_files(args.predict)
    st = load_stages(out, args.data, "rcae")
    device = common.get_device(args.device)
    for model, _ in st.values():
        model.to(device)
    fns = variant_fns(st, args.sigma, topk_frac_of(st, args.topk_frac))
    if args.variant not in fns:
        need = variant_stages(args.variant)[-1]
        raise UserError(f"--variant {args.variant} needs {CKPT[need]}, which {out} does not have: run "
                        f"`{HOW[need].format(data=args.data or 'PATH')}` first, or pick --variant "
                        f"{' or '.join(fns)}")
    size, resize = image_size_of(st), resize_of(st)
    images = []
    for f in files:
        try:
            images.append(common.read_image(f))  # (h, w, 3) uint8, any PIL mode
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"--predict {f}: not a readable image ({e})") from None
    wide = [f.name for f, im in zip(files, images) if im.shape[0] != im.shape[1]]
    if resize == "squash" and wide:
        common.warn(f"{len(wide)} of {len(files)} images are not square (e.g. {wide[0]}) and these stages squash "
                    f"them to {size}x{size} (trained with --resize squash); maps are taken back to each image's size")
    fn = fns[args.variant]
    thr, vmax = holdout_threshold(st, fn, args.variant, args, device)
    folder = new_folder(out / "predictions", f"{time.strftime('%Y%m%d-%H%M%S')}_{args.variant}")
    rows, used = [], set()
    for f, img in tqdm(list(zip(files, images)), desc="predict", unit="img", disable=None):
        h, w = img.shape[:2]
        x = torch.from_numpy(np.asarray(common.fit(Image.fromarray(img), size, resize)).copy())  # (S, S, 3) uint8
        m, s = fn(common.to_float(x.permute(2, 0, 1)[None]).to(device))  # (1, 1, S, S), (1,)
        m = map_to_image(m.float().cpu(), (h, w), size, resize, (h, w))[0, 0].numpy()  # (h, w)
        score = float(s[0])
        decision = "anomalous" if score > thr else "normal"
        name = f.stem if f.stem not in used else f"{f.stem}_{len(used)}"
        used.add(name)
        overlay(folder / f"{name}.png", img, m, f"{f.name}: {args.variant} score {score:.4g} "
                f"{'>' if score > thr else '<='} threshold {thr:.4g}: {decision}", vmax)
        rows.append([str(f), w, h, args.variant, repr(score), repr(thr), decision, str(folder / f"{name}.png")])
    with common.atomic_open(folder / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "width", "height", "variant", "score", "threshold", "decision",
                                   "overlay"], *rows])  # exact floats
    print(f"predict: {sum(r[6] == 'anomalous' for r in rows)} of {len(rows)} images anomalous with {args.variant} "
          f"(threshold {thr:.4g}, the {calibration(st).get('quantile') or 0.99} quantile of the holdout scores); "
          f"wrote {folder}")
    return rows


def main(argv=None):
    args = get_args(argv)
    if args.predict:
        return predict(args)
    cats = category_folders(args.data)
    if cats is None:
        return evaluate_category(args.data, args.out or common.default_out(args.data), args)
    return evaluate_root(args.data, cats, args)


if __name__ == "__main__":
    common.run_main(main)
