"""Shared plumbing for the three RcAE stages, evaluate.py and the FAIR baseline.

Only what every stage shares lives here; each stage file defines its own network
and loss and nothing else.

    data      loaders of every supported layout (detect_layout), --resize, decoded once into an in-memory
              uint8 cache, holdout split
    augment   pseudo anomalies: colour blocks, copy-paste, crack lines (paper, "Training Strategy")
    grad      the one first-order gradient operator I' of Eq. (5), (6), (7) and (9)
    runtime   shared flags, seeding, device, atomic self-describing checkpoints, upstream hand-off
    loop      the training loop: progress bar (images/s, ETA, loss parts), JSONL log, resume, NaN guard
    synth     a small synthetic MVTec-layout category for the tests and the quick start

Make a synthetic category (nothing to download):

    python common.py synth --out data/toy --size 128
"""
import argparse
import contextlib
import copy
import csv
import ctypes
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VERSION = 1  # checkpoint format version
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback (see run_main)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, with what is on disk: run_main prints `message`, exits 128 + signum."""

    def __init__(self, message="interrupted", signum=signal.SIGINT, told=False):
        super().__init__(message)
        self.message, self.signum, self.told = message, signum, told  # told: the message says what is on disk


def _raise_interrupted(signum, frame):
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


def run_main(main):
    """Entry point of every script: user errors become `error: ...` on stderr and exit code 2; Ctrl-C and
    SIGTERM (a cluster's time limit, `kill`) exit 130 / 143 with one line saying what is on disk."""
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        msg = getattr(e, "message", "interrupted")
        if not getattr(e, "told", False):  # outside a training loop
            msg += "; checkpoints are written whole (temp file + rename), so none on disk is half-written"
        print(f"\n{msg}", file=sys.stderr)
        sys.exit(128 + int(getattr(e, "signum", signal.SIGINT)))
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- data


@dataclass
class Sample:
    path: str
    mask: str | None  # ground-truth mask file; None for normal images and for anomalous ones without a mask
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type


# Folder layouts list_samples reads, detected by detect_layout (README, "Supported layouts"). For the tree
# layouts: (train folder of normal images, test folder with one sub-folder per kind, masks folder, the
# name of the normal kind). Masks are <masks>/<defect>/<stem>_mask.* or <stem>.* (any image suffix).
TREES = {"mvtec": ("train/good", "test", "ground_truth", "good"),  # MVTec AD, MPDD
         "mvtec_ad2": ("train/good", "test_public", "test_public/ground_truth", "good"),
         "btad": ("train/ok", "test", "ground_truth", "ok")}
LAYOUTS = ("MVTec AD / MPDD (train/good, test/<defect>, ground_truth/<defect>); "
           "MVTec AD 2 (train/good, test_public/{good,bad}, test_public/ground_truth/bad); "
           "BTAD (train/ok, test/{ok,ko}, ground_truth/ko); VisA (Data/Images next to ../split_csv/1cls.csv); "
           "a plain folder (good/, one folder per defect, optional masks/<defect>/)")
FOLDER_TEST_FRAC = 0.2  # plain folder: the part of good/ kept for the test split (anomalib's normal_split_ratio)


def detect_layout(root):
    """The layout of a category folder: a key of TREES, 'visa' or 'folder'; a UserError naming them all."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"--data {root}: not a folder (point it at one category, e.g. mvtec/bottle)")
    if (root / "test_public").is_dir():
        return "mvtec_ad2"
    if any((root / d).is_dir() for d in ("train/ok", "test/ok", "test/ko")):
        return "btad"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "mvtec"
    if (root / "Data" / "Images").is_dir():
        if not (root.parent / "split_csv" / "1cls.csv").is_file():
            raise UserError(f"--data {root} looks like VisA but {root.parent}/split_csv/1cls.csv is missing")
        return "visa"
    if (root / "good").is_dir():
        return "folder"
    raise UserError(f"--data {root} is not a category in a layout this code reads: {LAYOUTS}")


def is_category(folder):
    """True when `folder` is a category in one of the supported layouts (evaluate: a folder of categories)."""
    try:
        detect_layout(folder)
        return True
    except UserError:
        return False


def _images_in(folder):
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()) if folder.is_dir() else []


def list_samples(data, split):
    """The samples of one split ('train' or 'test') of a category, in a fixed (sorted) order."""
    root = Path(data)
    layout = detect_layout(root)
    if layout == "visa":
        samples = _list_visa(root, split)
    elif layout == "folder":
        samples = _list_folder(root, split)
    else:
        samples = _list_tree(root, split, *TREES[layout])
    if not samples:
        where = root / TREES[layout][0] if layout in TREES and split == "train" else root
        raise UserError(f"no {split} images found in {where}")
    return samples


def _masks_in(folder):
    """{image stem: mask file} of a masks folder: <stem>_mask.* or <stem>.*."""
    return {m.stem.removesuffix("_mask"): m for m in _images_in(folder)}


def _with_masks(images, gt, defect):
    """Samples of one anomalous kind, each with its mask in `gt` when there is one; a mask whose image is
    missing means a broken copy of the dataset and is refused, naming the file."""
    masks = _masks_in(gt)
    stems = {p.stem for p in images}
    for stem, m in sorted(masks.items()):
        if stem not in stems:
            raise UserError(f"mask {m} has no image (expected {defect}/{stem}.* next to the other test images)")
    return [Sample(str(p), str(masks[p.stem]) if p.stem in masks else None, 1, defect) for p in images]


def _list_tree(root, split, train_dir, test_dir, gt_dir, good):
    if split == "train":
        if not (root / train_dir).is_dir():
            raise UserError(f"{root} has no {train_dir} folder of normal training images")
        return [Sample(str(p), None, 0, "good") for p in _images_in(root / train_dir)]
    test, gt = root / test_dir, root / gt_dir
    if not test.is_dir():
        raise UserError(f"{root} has no {test_dir} folder")
    samples = []
    for defect in sorted(d.name for d in test.iterdir() if d.is_dir() and d != gt):
        images = _images_in(test / defect)
        if defect == good:
            samples += [Sample(str(p), None, 0, "good") for p in images]
        else:
            samples += _with_masks(images, gt / defect, defect)
    for d in sorted(gt.iterdir()) if gt.is_dir() else []:
        if d.is_dir() and not (test / d.name).is_dir() and _images_in(d):
            raise UserError(f"mask {_images_in(d)[0]} has no image (no folder {test / d.name})")
    return samples


def _list_folder(root, split):
    """good/ (normal), every other folder but masks/ anomalous, masks/<defect>/ optional. The normal images
    are split like anomalib's Folder: an evenly spread FOLDER_TEST_FRAC of good/ is test, the rest train."""
    good = _images_in(root / "good")
    train, test = holdout_indices(len(good), FOLDER_TEST_FRAC)
    if split == "train":
        return [Sample(str(good[i]), None, 0, "good") for i in train]
    samples = [Sample(str(good[i]), None, 0, "good") for i in test]
    for d in sorted(d for d in root.iterdir() if d.is_dir() and d.name not in ("good", "masks")):
        samples += _with_masks(_images_in(d), root / "masks" / d.name, d.name)
    return samples


def _list_visa(root, split):
    csv_path = root.parent / "split_csv" / "1cls.csv"
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("object") == root.name and r.get("split") == split]
    samples = []
    for r in rows:
        path = root.parent / r["image"]
        if not path.is_file():
            raise UserError(f"{csv_path} lists {r['image']} but {path} does not exist")
        label = int(r["label"] in ("anomaly", "1", "bad"))
        mask = root.parent / r["mask"] if r.get("mask") else None
        has = label and mask is not None and mask.is_file()  # an anomalous image without a mask: image-level only
        samples.append(Sample(str(path), str(mask) if has else None, label, "anomaly" if label else "good"))
    listed = {str(Path(s.mask).resolve()) for s in samples if s.mask}
    masks = root / "Data" / "Masks" / "Anomaly"
    if split == "test" and masks.is_dir():
        for m in sorted(masks.iterdir()):
            if m.suffix.lower() in IMAGE_EXTS and str(m.resolve()) not in listed:
                raise UserError(f"mask {m} has no image in the test split of {csv_path}")
    return samples


# How an image of any aspect ratio becomes the square model input (--resize):
#   squash  resize to size x size, changing the aspect ratio of a non-square image (the paper's way)
#   pad     resize the long side to size, pad the short one with black (letterbox): nothing lost
#   crop    resize the short side to size, crop the centre: the borders of the long side are not seen
RESIZE = ("squash", "pad", "crop")


def placement(h, w, size, resize):
    """Where an (h, w) image lands in the size x size model input: it is resized to (rh, rw) and its
    top-left corner put at (top, left), negative for crop."""
    if resize == "squash":
        return size, size, 0, 0
    s = size / (max(h, w) if resize == "pad" else min(h, w))
    rh, rw = max(1, round(h * s)), max(1, round(w * s))
    return rh, rw, (size - rh) // 2, (size - rw) // 2


def _fit(im, size, resize, resample):
    """PIL image -> size x size PIL image by `resize` (see RESIZE)."""
    rh, rw, top, left = placement(im.height, im.width, size, resize)
    im = im.resize((rw, rh), resample)
    if (rh, rw) == (size, size):
        return im
    canvas = Image.new(im.mode, (size, size))  # black / False outside the image
    canvas.paste(im, (left, top))  # a negative offset crops
    return canvas


def metric_frame(h, w, size):
    """The grid an (h, w) image's map is evaluated on: its own aspect ratio, the long side `size` px."""
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def map_to_image(m, hw, size, resize, out_hw):
    """A map of the model input back onto the image: (B, 1, size, size) -> (B, 1, *out_hw), the inverse of
    `resize` for an original of hw = (h, w). Pixels that crop never showed the model get 0."""
    rh, rw, top, left = placement(*hw, size, resize)
    canvas = m.new_zeros(*m.shape[:2], rh, rw)  # (B, 1, rh, rw): the resized image
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(size, top + rh), min(size, left + rw)
    canvas[..., y0 - top:y1 - top, x0 - left:x1 - left] = m[..., y0:y1, x0:x1]
    if (rh, rw) == tuple(out_hw):
        return canvas
    return F.interpolate(canvas, size=tuple(out_hw), mode="bilinear", align_corners=False)


def _open_rgb(path):
    """Any PIL mode (L, RGB, RGBA, P, 16-bit, ...) -> an RGB PIL image; raises on truncated files."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else (255.0 if a.max() > 1 else 1.0)
            im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
        elif im.mode == "P":
            im = im.convert("RGBA")
        return im.convert("RGB")


def read_image(path, size, resize="squash"):
    """Image file -> (size, size, 3) uint8 RGB, bilinear, by `resize` (see RESIZE)."""
    return np.asarray(_fit(_open_rgb(path), size, resize, Image.BILINEAR), dtype=np.uint8)


def fit_image(img, size, resize="squash"):
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by `resize`, exactly as read_image does it."""
    return np.asarray(_fit(Image.fromarray(img), size, resize, Image.BILINEAR), dtype=np.uint8)


def read_image_full(path):
    """Image file -> (H, W, 3) uint8 RGB at its own size."""
    return np.asarray(_open_rgb(path), dtype=np.uint8)


def read_mask(path, size, resize="squash"):
    """Mask file -> bool binarised at > 0, nearest: (size, size) by `resize`, or (h, w) for size=(h, w)."""
    with Image.open(path) as im:
        im.load()
        a = np.asarray(im.convert("L") if im.mode not in ("I", "I;16", "F", "L") else im)
        m = Image.fromarray((a > 0).astype(np.uint8) * 255)
        m = m.resize(size[::-1], Image.NEAREST) if isinstance(size, tuple) else _fit(m, size, resize, Image.NEAREST)
        return np.asarray(m) > 0


def image_hw(path):
    """(height, width) of an image file, from its header."""
    with Image.open(path) as im:
        return im.height, im.width


@dataclass
class Split:
    images: torch.Tensor  # (M, 3, H, W) uint8, the model input (--resize)
    masks: torch.Tensor  # (M, 1, H, W) bool, the same geometry; all False for normal images and missing masks
    labels: torch.Tensor  # (M,) int64
    samples: list  # the Sample of each row
    sizes: list  # (height, width) of each original image
    resize: str = "squash"

    def __len__(self):
        return len(self.samples)

    @property
    def has_mask(self):
        """(M,) bool: the pixel ground truth is known (normal images, anomalous ones with a mask file)."""
        return torch.tensor([s.label == 0 or s.mask is not None for s in self.samples], dtype=torch.bool)


def _decode(sample, size, resize):
    try:
        img = read_image(sample.path, size, resize)
        mask = read_mask(sample.mask, size, resize) if sample.mask else np.zeros((size, size), bool)
        hw = image_hw(sample.path)
    except (OSError, SyntaxError, ValueError) as e:
        warn(f"skipping unreadable file for {sample.path}: {e}")
        return None
    return img, mask, hw


@lru_cache(maxsize=8)
def load_split(data, split, image_size, workers=4, resize="squash"):
    """Decode a split once (threads) into memory; later calls in the same process hit the cache."""
    if resize not in RESIZE:
        raise UserError(f"--resize {resize}: choose one of {', '.join(RESIZE)}")
    samples = list_samples(data, split)
    decode = partial(_decode, size=image_size, resize=resize)
    if workers == 0:  # --workers 0: nothing runs beside the calling thread
        decoded = [decode(s) for s in samples]
    else:
        with ThreadPoolExecutor(workers or 4) as pool:
            decoded = list(pool.map(decode, samples))
    keep = [i for i, d in enumerate(decoded) if d is not None]
    if not keep:
        raise UserError(f"none of the {len(samples)} {split} images in {data} could be read")
    images = torch.from_numpy(np.stack([decoded[i][0] for i in keep])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([decoded[i][1] for i in keep]))[:, None]
    labels = torch.tensor([samples[i].label for i in keep])
    sizes = [decoded[i][2] for i in keep]
    n_wide = sum(h != w for h, w in sizes)
    if resize == "squash" and n_wide:  # once per split and process: load_split is cached
        warn(f"{n_wide} of {len(sizes)} {split} images in {data} are not square and --resize squash changes "
             f"their aspect ratio (e.g. {sizes[[h != w for h, w in sizes].index(True)]}); --resize pad or crop keeps it")
    return Split(images, masks, labels, [samples[i] for i in keep], sizes, resize)


def holdout_indices(n, frac):
    """A fixed, evenly spread part of train/good for threshold calibration: (train_idx, holdout_idx).

    Evenly spread over the sorted file list rather than random, so it does not depend on the seed and
    covers the whole acquisition sequence. Every stage trains on train_idx only."""
    m = 0 if frac <= 0 or n < 2 else min(n - 1, max(1, round(n * frac)))
    hold = sorted(set(np.linspace(0, n - 1, m).round().astype(int).tolist())) if m else []
    train = [i for i in range(n) if i not in set(hold)]
    return train, hold


def fraction_indices(n, frac):
    """The first round(n * frac) (at least 1) of a fixed permutation of range(n), sorted (paper, Table 5).

    The permutation depends on n only, not on --seed: every run and every stage picks the same images, and
    a smaller fraction is always inside a larger one (10% inside 25% inside 50% ...)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(order[:max(1, round(n * frac))]) if n else []


def why_no_holdout(holdout):
    """Why a run has no holdout images: --holdout 0, or a train/good too small to spare one."""
    return "--holdout 0" if not holdout else f"train/good too small to keep a --holdout {holdout} of it"


def train_images(args, part="train"):
    """uint8 (M, 3, H, W) images of train/good: part 'train' (what every stage trains on: --train_fraction of
    what the holdout leaves) or 'holdout' (kept out of all training, for threshold calibration; the same
    images whatever --train_fraction is)."""
    split = load_split(args.data, "train", args.image_size, args.workers, getattr(args, "resize", None) or "squash")
    train, hold = holdout_indices(len(split), args.holdout)
    frac = getattr(args, "train_fraction", None) or BEFORE_FLAG["train_fraction"]
    train = [train[i] for i in fraction_indices(len(train), frac)]
    return split.images[train if part == "train" else hold]


def to_float(x):
    """uint8 (..., C, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255)


# ----------------------------------------------------------------------------- augmentation


def _blob(size, coverage, gen):
    """An irregular region covering `coverage` of a size x size block: thresholded smooth noise."""
    noise = torch.rand(1, 1, 4, 4, generator=gen)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    return field >= torch.quantile(field.flatten(), 1.0 - coverage)


def _crack(h, w, y, x, scale, gen):
    """1-4 connected random line segments of 50-150 px (at 1024 px, scaled) from (y, x): a crack."""
    pts = []
    angle = float(torch.rand(1, generator=gen)) * 2 * math.pi
    for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
        length = (50 + 100 * float(torch.rand(1, generator=gen))) * scale
        angle += (float(torch.rand(1, generator=gen)) - 0.5) * math.pi / 1.5  # bends like a crack
        t = torch.linspace(0, 1, max(2, int(length * 2)))
        pts.append(torch.stack([y + t * length * math.sin(angle), x + t * length * math.cos(angle)], 1))
        y, x = pts[-1][-1].tolist()
    p = torch.cat(pts).round().long()
    p = p[(p[:, 0] >= 0) & (p[:, 0] < h) & (p[:, 1] >= 0) & (p[:, 1] < w)]
    line = torch.zeros(1, 1, h, w)
    line[0, 0, p[:, 0], p[:, 1]] = 1
    k = max(1, round((2 + 6 * float(torch.rand(1, generator=gen))) * scale)) | 1  # 2-8 px at 1024, odd
    return F.max_pool2d(line, k, 1, k // 2)[0, 0] > 0  # thicken the 1-px line


def _warp(block, gen, amplitude=0.25):
    """block (C, h, w) resampled along a smooth random displacement field of up to `amplitude` of the block's
    half-sides (bilinear, border-clamped): the same texture and intensities, moved. -> (C, h, w)."""
    h, w = block.shape[-2:]
    flow = F.interpolate(torch.rand(1, 2, 3, 3, generator=gen) * 2 - 1, size=(h, w), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1)  # (1, h, w, 2)
    grid = F.affine_grid(torch.eye(2, 3)[None], (1, 1, h, w), align_corners=False)  # (1, h, w, 2) identity
    return F.grid_sample(block[None], grid + amplitude * flow, padding_mode="border", align_corners=False)[0]


ANOMALY_SIZES = ("scaled", "pixels", "relative")
# --opacity: how strongly a pseudo anomaly is blended over the image, alpha * anomaly + (1 - alpha) * image.
# "strong" (our first reading; the paper gives no opacity): colour blocks at alpha ~ U[0.5, 1], pastes and
# cracks opaque. "draem": every kind at alpha ~ U[0.1, 1], the opacity beta of DRAEM's simulated anomalies
# ("DRAEM - A discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021),
# so faint anomalies are drawn too, as real defects often are.
OPACITIES = ("strong", "draem")
# --anomaly_place: where a block goes. "inside" (our first reading of "a random place"): the whole block lies in
# the image, so a pixel near the border is rarely covered (at 128 px with relative sizes 5-7% of the masked pixels
# lie within 8 px of it, where a quarter of the image's area does). "anywhere": the block's centre is uniform over the
# image and the border cuts the block, as DRAEM's anomaly masks (Perlin noise over the whole image) do.
PLACES = ("inside", "anywhere")
# --anomaly_colour: the colour of colour blocks and cracks. "uniform" (our first reading; the paper gives none):
# U[0, 1] per channel. "image": U[min, max] of the image's own values per channel, so no pseudo anomaly is brighter
# or darker than everything in its image: on a dark category most uniform colours are, and CRD can find them by
# brightness alone, a cue no real defect of that category gives (README, "Reading the paper").
COLOURS = ("uniform", "image")
ANOMALY_KINDS = ("colour", "paste", "crack")  # pseudo_anomaly's kinds; in this order all three draw the old stream
WARP = "warp"  # a kind no stage trains on, for validations only (benchmarks.revalidate --anomaly_kind warp)
MIN_VISIBLE = 0.5  # a masked pixel changed by more than this fraction of the image's intensity std


def _is_gray(img):
    """True when every channel of img (C, H, W) is the same: a grayscale image stored as RGB."""
    return bool((img == img[:1]).all())


def pseudo_anomaly(img, gen, max_blocks=3, block_sizes=(32, 64, 128), base_size=1024, size_mode="scaled",
                   opacity="strong", kinds=ANOMALY_KINDS, place="inside", colours="uniform"):
    """Paste pseudo anomalies into one image (paper, "Training Strategy"; README, "Reading the paper").

    img: (C, H, W) float in [0, 1]; gen: torch.Generator, the only source of randomness.
    Each of 1..max_blocks random blocks gets one of: a random colour blended over a region covering 0-100%
    of the block, a copy of another block of the same image pasted over such a region, or a crack of 1-4
    lines of 50-150 px. Block sizes 32, 64 or 128 px and the crack lengths follow size_mode:
      "scaled"   the paper's sizes are for 1024 px input: scaled by H/1024 (4-16 px blocks at 128 px);
      "pixels"   the paper's sizes in pixels of the training resolution, whatever it is;
      "relative" block sides of 1/8, 1/4 or 1/2 of the image, cracks 0.2-0.6 of it (DRAEM-like sizes).
    Colours stay in the image's colour space: a grayscale image gets gray anomalies. `opacity` (OPACITIES)
    says how strongly each kind is blended over the image. `kinds` (names from ANOMALY_KINDS and WARP) are the
    kinds drawn, with equal chance; all three (the default) is what every stage trains on, and draws the same stream
    as before the option existed (benchmarks.revalidate validates on one kind at a time). WARP, a fourth kind
    for validations only, moves the block's own texture along a smooth random field (geometry, no new intensities).
    `place` (PLACES): "inside" keeps every block inside the image; "anywhere" centres it anywhere, the border
    cutting it. `colours` (COLOURS): "uniform" draws colours from [0, 1], "image" from the image's own range
    per channel (the same draws, mapped into it).
    Returns (image (C, H, W), mask (1, H, W) float). The mask marks the changed pixels that are visible:
    changed by more than MIN_VISIBLE x the image's intensity std (at least 1/255), so a patch pasted onto
    similar texture is not labelled as an anomaly nobody could see.
    """
    unknown = (sorted({*kinds} - {*ANOMALY_KINDS, WARP}) + ([place] if place not in PLACES else [])
               + ([colours] if colours not in COLOURS else []))
    if unknown or not kinds:
        raise ValueError(f"pseudo_anomaly: unknown kinds, place or colours {unknown or kinds}: kinds are "
                         f"{(*ANOMALY_KINDS, WARP)}, places {PLACES}, colours {COLOURS}")
    c, h, w = img.shape
    scale = {"scaled": h / base_size, "pixels": 1.0, "relative": 4 * h / base_size}[size_mode]
    gray = _is_gray(img)
    if colours == "image":  # (C, 1, 1) each channel's range in this image
        lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)

    def colour(*shape):  # (C, *shape) random colour, the same in every channel of a gray image
        v = torch.rand(1 if gray else c, *shape, generator=gen)
        v = v.expand(c, *shape) if gray else v
        return lo.view(c, *[1] * len(shape)) + (hi - lo).view(c, *[1] * len(shape)) * v if colours == "image" else v

    def alpha(low):  # the opacity of one anomaly: U[low, 1] ("draem": U[0.1, 1]); 1 (opaque) draws nothing
        low = 0.1 if opacity == "draem" else low
        return 1.0 if low >= 1 else low + (1 - low) * float(torch.rand(1, generator=gen))

    def blend(under, over, a):
        return over if a == 1 else (1 - a) * under + a * over

    out, region = img.clone(), torch.zeros(h, w, dtype=torch.bool)
    for _ in range(int(torch.randint(1, max_blocks + 1, (1,), generator=gen))):
        s = min(h, w, max(4, round(block_sizes[int(torch.randint(len(block_sizes), (1,), generator=gen))] * scale)))
        if place == "inside":
            y = int(torch.randint(0, h - s + 1, (1,), generator=gen))
            x = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        else:  # the centre anywhere: the block's top-left may lie above or left of the image
            y = int(torch.randint(0, h, (1,), generator=gen)) - s // 2
            x = int(torch.randint(0, w, (1,), generator=gen)) - s // 2
        y0, y1, x0, x1 = max(y, 0), min(y + s, h), max(x, 0), min(x + s, w)  # the part in the image
        cut = (slice(None), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))  # that part in block coordinates
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        if kind == "crack":  # crack-like random lines, drawn in one random colour
            m = _crack(h, w, y + s / 2, x + s / 2, scale, gen)
            a = alpha(1.0)  # opaque under "strong"
            out[:, m] = blend(out[:, m], colour(1), a)
            region |= m
            continue
        coverage = 0.05 + 0.95 * float(torch.rand(1, generator=gen))
        m = _blob(s, coverage, gen)[cut[1:]]
        block = out[:, y0:y1, x0:x1]
        if kind == "colour":  # random colour block, blended
            a = alpha(0.5)
            patch = blend(block, colour(1, 1), a)
        elif kind == WARP:  # the block's own content displaced by a smooth random field: a dent, a bent thread
            patch = blend(block, _warp(block, gen), alpha(1.0))
        else:  # "paste": copy & paste a patch from elsewhere in the same image
            sy = int(torch.randint(0, h - s + 1, (1,), generator=gen))
            sx = int(torch.randint(0, w - s + 1, (1,), generator=gen))
            patch = blend(block, img[:, sy:sy + s, sx:sx + s][cut], alpha(1.0))  # opaque under "strong"
        block[:, m] = patch[:, m]
        region[y0:y1, x0:x1] |= m
    visible = (out - img).abs().amax(0) > max(1 / 255, MIN_VISIBLE * float(img.std()))  # (H, W)
    return out, (region & visible)[None].float()


def augment_batch(x, gen, prob, size_mode="scaled", opacity="strong", kinds=ANOMALY_KINDS, place="inside",
                  colours="uniform"):
    """Pseudo anomalies on each image of a batch with probability `prob`.

    x: (B, C, H, W) float in [0, 1] -> (images (B, C, H, W), masks (B, 1, H, W))."""
    out, masks = x.clone(), torch.zeros_like(x[:, :1])
    for i in range(len(x)):
        if float(torch.rand(1, generator=gen)) < prob:
            out[i], masks[i] = pseudo_anomaly(x[i], gen, size_mode=size_mode, opacity=opacity, kinds=kinds,
                                              place=place, colours=colours)
    return out, masks


def topk_mean(maps, frac):
    """Image score: the mean of the top `frac` of each map's pixels (paper: "averaging the top-k pixel
    scores", k not given). maps (B, 1, H, W) or (B, H, W) -> (B,)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, round(frac * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


# ----------------------------------------------------------------------------- gradient


def grad(x):
    """First-order gradient I' of Eq. (5), (6), (7), (9): forward differences, zero past the border.

    (B, C, H, W) -> (B, 2C, H, W) as [d/dx, d/dy]."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))  # (B, C, H, W)
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))  # (B, C, H, W)
    return torch.cat([dx, dy], dim=1)


def conv_cat(conv, *parts):
    """conv(torch.cat(parts, 1)) for an nn.Conv2d/Conv3d, as the sum of one conv per part over its slice of
    the weight. Equal up to float rounding, without the concat's copy forward and backward: x1.25-1.4 on
    the training steps of stages 1-3 (benchmarks/optimisations.py). parts (B, c_i, ...), sum c_i = in_channels."""
    out, i = None, 0
    for p in parts:
        y = conv._conv_forward(p, conv.weight[:, i:i + p.shape[1]], conv.bias if i == 0 else None)
        out, i = y if out is None else out + y, i + p.shape[1]
    if i != conv.in_channels:
        raise ValueError(f"conv_cat: the parts have {i} channels, the conv takes {conv.in_channels}")
    return out


# ----------------------------------------------------------------------------- runtime


INHERITED = ("image_size", "depth", "holdout", "resize", "train_fraction")  # a downstream stage takes these from stage 1
# what a checkpoint written before a flag existed did (for the pseudo-anomaly flags: what its stage drew)
BEFORE_FLAG = {"resize": "squash", "train_fraction": 1.0, "anomaly_size": "scaled", "opacity": "strong",
               "anomaly_place": "inside", "anomaly_colour": "uniform"}


# --lr_schedule: multiplier of --lr at optimiser step `step` (1-based) of `total`. The paper gives no schedule
# ("constant"). "cosine" ends the run at a small lr, so the weights it saves are not wherever Adam's noise at a
# large constant lr left them on the last step (README, "Reading the paper").
LR_SCHEDULES = {"constant": None, "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * (step - 1) / total))}


class EMA:
    """--ema DECAY: an exponential moving average of the trained weights (Polyak averaging), the weights a
    finished run saves. The paper gives none. A constant large lr leaves the last step's weights wherever Adam's
    noise put them; the average over about the last 1/(1 - DECAY) steps is not moved by that noise, and training
    itself is unchanged (the raw weights take the same steps with or without it). decay_t = min(DECAY, (1 + t) /
    (10 + t)) after t steps, so the first steps are not averaged with the initialisation."""

    def __init__(self, model, decay, state=None):
        self.decay, self.model = decay, copy.deepcopy(model)  # (eval copy; never receives gradients)
        if state is not None:
            self.model.load_state_dict(state)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            e.lerp_(m, 1 - d) if e.is_floating_point() else e.copy_(m)  # buffers that never change stay as they are


# Named recipes: the defaults of each stage's flags that a recipe changes (explicit flags still win).
# "paper" is the paper's settings (1024 px, lr 1e-4, 1500/400/300 epochs: days on a CPU). "cpu" is the
# recipe measured on this project's 2-core CPU (README, "Results"): 128 px, lr 1e-3, the step budget of the
# README's 10-minute comparison; the tables under Results were trained with it. "cpu2", the one to use on a
# CPU, adds what stage 1's reconstruction target and the dark copies asked for: stage 1's down and up started
# at the principal components with a moving average of its weights, CRD's residuals divided by their normal
# level at each pixel, and pseudo-anomaly colours within each image's range. Reasons: README, "Reading the paper".
CPU = {"stage1_rcae": dict(image_size=128, lr=1e-3, max_steps=1758),
       "stage2_dpn": dict(lr=1e-3, max_steps=263),
       "stage3_crd": dict(lr=1e-3, loss="focal", anomaly_size="relative", init_prior=0.01, max_steps=258)}
CPU2 = {"stage1_rcae": dict(updown_init="pca", ema=0.99, anomaly_colour="image"),
        "stage2_dpn": dict(anomaly_colour="image"),
        "stage3_crd": dict(crd_norm="position", anomaly_colour="image")}
RECIPES = {"paper": {}, "cpu": CPU, "cpu2": {stage: {**CPU[stage], **CPU2[stage]} for stage in CPU}}


def parse_args(p, argv, stage):
    """Parse a stage's flags: the --recipe's defaults first, then what was given explicitly; validated."""
    args = p.parse_args(argv)
    recipe = RECIPES[getattr(args, "recipe", "paper")].get(stage, {})
    if recipe:
        unknown = set(recipe) - set(vars(args))  # set_defaults would take a misspelt flag silently
        assert not unknown, f"RECIPES[{args.recipe!r}][{stage!r}] names flags {stage} does not have: {sorted(unknown)}"
        p.set_defaults(**recipe)
        args = p.parse_args(argv)
    return finish_args(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default printed once: not appended where the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


SHARED_DEFAULTS = dict(image_size=1024, epochs=100, batch_size=8, lr=1e-4, depth=5, holdout=0.1, resize="squash",
                       train_fraction=1.0)  # of the flags of add_shared_args; a stage overrides some (its paper's)


def add_shared_args(p, recursion=True, upstream=False, paper="paper", **defaults):
    """The flags every stage shares (names fixed: later stages, evaluate and the checks rely on them).

    `defaults` overrides per stage, with the values of its paper (`paper` names it in --help). upstream=True
    (stages 2 and 3) makes the INHERITED flags default to None, "inherit from the stage-1 checkpoint"; an
    explicit value must agree with it (see inherit). recursion=False leaves out --depth (the FAIR baseline
    has no recursion)."""
    d = {**SHARED_DEFAULTS, **defaults}
    said = {k: f"(default: {d[k]}, as in the {paper})" for k in ("image_size", "depth", "epochs")}
    if upstream:
        d.update({k: None for k in INHERITED})
        said.update({k: "(default: inherited from stage 1)" for k in INHERITED})
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="category folder in a supported layout (README): MVTec AD (e.g. "
                                                 "mvtec/bottle), MVTec AD 2, BTAD, MPDD, VisA (visa/candle), plain")
    g.add_argument("--out", default=None, help="output folder (default: runs/<parent>/<category>)")
    g.add_argument("--image_size", type=int, default=d["image_size"], help=f"square input size {said['image_size']}")
    g.add_argument("--resize", choices=RESIZE, default=d["resize"],
                   help="non-square images: squash (paper), pad (letterbox) or crop (centre) to the square input"
                        + (f" {said['resize']}" if upstream else ""))
    g.add_argument("--holdout", type=float, default=d["holdout"],
                   help="fraction of train/good kept out of training to calibrate the image threshold"
                        + (f" {said['holdout']}" if upstream else ""))
    g.add_argument("--train_fraction", type=float, default=d["train_fraction"],
                   help="train on this fraction of what the holdout leaves of train/good: a fixed subset, nested "
                        "across fractions (paper, Table 5: 0.1, 0.25, 0.5, 0.75, 1)"
                        + (f" {said['train_fraction']}" if upstream else ""))
    g.add_argument("--workers", type=int, default=None,
                   help="batch-making worker processes (and image-decoding threads); default: 0 when training "
                        "on the CPU, where workers compete with the compute threads (x0.78 measured), else 4")
    if recursion:
        g.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                       help="named defaults: paper (the paper's settings), cpu (128 px, lr 1e-3, the README's "
                            "10-minute step budget: the recipe of its tables) or cpu2 (cpu with stage 1's pca start "
                            "and weight average, CRD's position norm and image-range pseudo-anomaly colours: the "
                            "one to use on a CPU); explicit flags override any")
        g = p.add_argument_group("model")
        g.add_argument("--depth", type=int, default=d["depth"], help=f"recursion depth N {said['depth']}")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"], help=f"passes over train/good {said['epochs']}")
    g.add_argument("--max_steps", type=int, default=None, help="cap on optimiser steps (quick runs)")
    g.add_argument("--max_minutes", type=float, default=None,
                   help="stop (and checkpoint) after this much training time; the same command resumes")
    g.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help=f"images per step (default: {d['batch_size']}, as in the {paper})" if "batch_size" in defaults
                   else "images per step (paper: not given)")
    g.add_argument("--lr", type=float, default=d["lr"], help=f"Adam learning rate ({paper}: 1e-4, betas 0.9/0.999)")
    if recursion:  # FAIR keeps its own schedule (baselines/fair.py)
        g.add_argument("--lr_schedule", choices=sorted(LR_SCHEDULES), default="constant",
                       help="constant (the paper gives no schedule) or cosine (decays to 0 over the run's steps)")
        g.add_argument("--ema", type=float, default=0.0,
                       help="0: save the last step's weights (paper); DECAY in (0, 1): save an exponential moving "
                            "average of the weights over about the last 1/(1-DECAY) steps (common.EMA)")
    g = p.add_argument_group("runtime / io")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, batches and augmentation")
    g.add_argument("--amp", type=int, default=1, help="bf16 autocast on CUDA (1/0); ignored on CPU")
    g.add_argument("--compile", type=int, default=0, help="torch.compile the trained network (1/0)")
    g.add_argument("--save_every", type=int, default=500, help="checkpoint every this many steps")
    g.add_argument("--save_every_min", type=float, default=5,
                   help="also checkpoint when this many minutes passed since the last save (0: off); Ctrl-C and "
                        "SIGTERM save the step in flight too")
    g.add_argument("--log_every", type=int, default=10, help="log the loss parts every this many steps")
    g.add_argument("--val_every", type=int, default=500,
                   help="validate on the holdout normal images every this many steps, and at the end (0: end only)")
    g.add_argument("--overwrite", action="store_true", help="start over even if <out> has a checkpoint")
    return p


def add_anomaly_args(g, prob_help):
    """The pseudo-anomaly flags of the stages that draw them (1 and 3; 2 with --anomaly_prob > 0), into group g."""
    g.add_argument("--anomaly_prob", type=float, default=0.5, help=prob_help)
    g.add_argument("--anomaly_size", choices=ANOMALY_SIZES, default="scaled",
                   help="pseudo-anomaly sizes: the paper's 32-128 px blocks scaled by image_size/1024, in pixels "
                        "of this resolution, or relative to the image (see common.pseudo_anomaly)")
    g.add_argument("--opacity", choices=OPACITIES, default="strong",
                   help="how strongly pseudo anomalies are blended in: strong (colour blocks at 0.5-1, pastes and "
                        "cracks opaque; the paper gives none) or draem (every kind at U[0.1, 1], DRAEM's opacity)")
    g.add_argument("--anomaly_place", choices=PLACES, default="inside",
                   help="where pseudo anomalies go: inside (every block wholly in the image) or anywhere (the "
                        "block's centre anywhere, the border cutting it, so anomalies reach the border too)")
    g.add_argument("--anomaly_colour", choices=COLOURS, default="uniform",
                   help="colours of colour blocks and cracks: uniform (U[0, 1] per channel) or image (within the "
                        "image's own range per channel, so none is brighter or darker than all of the image)")


def anomaly_kwargs(args):
    """The flags add_anomaly_args added, as the keyword arguments of the stages' make_batch."""
    return {"anomaly_prob": args.anomaly_prob, "anomaly_size": args.anomaly_size, "opacity": args.opacity,
            "anomaly_place": args.anomaly_place, "anomaly_colour": args.anomaly_colour}


def default_out(data):
    """runs/<parent>/<category>: mvtec/bottle -> runs/mvtec/bottle."""
    p = Path(data).resolve()
    return str(Path("runs") / p.parent.name / p.name)


# The ranges check_flags knows: rule -> (test, what the error says)
RANGES = {">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"), ">=1": (lambda v: v >= 1, ">= 1"),
          "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"), "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
          "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"), "0/1": (lambda v: v in (0, 1), "0 or 1"),
          "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"), "odd": (lambda v: v >= 1 and v % 2, "an odd number >= 1")}


def check_flags(args, **rules):
    """Refuse a numeric flag out of its range with one line: check_flags(args, lr=">0") -> UserError
    "--lr must be > 0 (got -1.0)". None (not given, or inherited later) passes; nan and inf never do. A
    list-valued flag (nargs="+") is checked element by element."""
    for k, rule in rules.items():
        v = getattr(args, k, None)
        test, what = RANGES[rule]
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None and not (math.isfinite(x) and test(x)):
                raise UserError(f"--{k} must be {what} (got {v})")


def finish_args(args):
    """Validate the shared flags and fill derived ones; returns args."""
    if args.out is None:
        args.out = default_out(args.data)
    check_flags(args, depth=">=1", epochs=">=1", batch_size=">=1", max_steps=">=0", max_minutes=">=0",
                holdout="[0,1)", workers=">=0", lr=">0", seed="seed", amp="0/1", compile="0/1", save_every=">=1",
                save_every_min=">=0", log_every=">=1", val_every=">=0", ema="[0,1)")
    if args.image_size is not None:
        check_size(args.image_size, getattr(args, "depth", None) or 0)
    if getattr(args, "train_fraction", None) is not None and not 0 < args.train_fraction <= 1:
        raise UserError(f"--train_fraction must be in (0, 1] (got {args.train_fraction})")
    return args


def check_size(image_size, depth):
    if image_size < 1:
        raise UserError(f"--image_size must be >= 1 (got {image_size})")
    k = 2 ** depth
    if image_size < k or image_size % k:
        ok = max(k, round(image_size / k) * k)
        raise UserError(f"--image_size {image_size} cannot be halved {depth} times (--depth {depth}): "
                        f"use a multiple of {k}, e.g. {ok}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # another C library (macOS, Windows, musl): the defaults stay


def keep_freed_memory(keep=True):
    """Keep freed memory in the process instead of glibc's default, which hands every freed block over 32 MB
    back to the OS: each training step then page-faults its activations in again (stage 2 at 256 px on
    CPU: x2.9, system time 19 s -> 4 s; benchmarks/optimisations.py). The process holds its peak memory
    between steps, as it would at the next step anyway. keep=False restores glibc's fixed defaults."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-4, 0 if keep else 65536)  # M_MMAP_MAX: 0 = large blocks come from the heap and are reused
        libc.mallopt(-1, -1 if keep else 128 * 1024)  # M_TRIM_THRESHOLD: -1 = never shrink the heap


def release_memory():
    """Hand kept free memory back to the OS when a process moves on to other shapes (the next stage, the
    next benchmark size): their blocks leave holes that would otherwise stay resident (OOM at 24 GiB)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def get_device(name="auto"):
    """The torch device for --device. Also flushes denormal floats to zero on the CPU, where CRD's
    near-saturated maps otherwise produce denormals that slow every step down many times over, and
    keeps freed memory for the next step (keep_freed_memory)."""
    torch.set_flush_denormal(True)
    keep_freed_memory()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


AMP_DEVICE_TYPES = ("cuda",)  # where --amp 1 autocasts: bf16 on this CPU was slower (x0.68, benchmarks/optimisations.py)


def autocast(device, enabled=True):
    """The one AMP pattern, for training losses and inference alike: bf16 autocast on CUDA, a no-op elsewhere
    (a test adds "cpu" to AMP_DEVICE_TYPES to run the same bf16 path on the CPU)."""
    on = bool(enabled) and device.type in AMP_DEVICE_TYPES
    return torch.autocast(device.type if on else "cuda", dtype=torch.bfloat16, enabled=on)


def plain(d):
    """argparse namespace / dict -> dict of plain types (weights_only-loadable)."""
    d = vars(d) if isinstance(d, argparse.Namespace) else dict(d)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Open a temp file beside `path` (its folders made); on a clean exit it replaces `path`, so readers see
    the old file or the new one, never half of one; on an error (or ctrl-c) it is removed and `path` kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic_open(path) as f:
        f.write(text)


def json_safe(v):
    """nan -> None (null in JSON; json.dumps would write NaN, which is not JSON) through dicts and lists."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def write_json(path, obj):
    """Every JSON result file of the project: atomic, nan as null, one key per line."""
    write_text(path, json.dumps(json_safe(obj), indent=1))


def save_checkpoint(path, stage, model, model_config, args, step, **extra):
    """Atomic write of a self-describing checkpoint: {stage, model (state_dict), model_config, args, step,
    version, **extra}, tensors and plain types only (loads with weights_only=True)."""
    ck = dict(stage=stage, model=model.state_dict(), model_config=plain(model_config), args=plain(args),
              step=step, version=VERSION, **extra)
    with atomic_open(path, "wb") as f:
        torch.save(ck, f)


def load_checkpoint(path, stage, hint=""):
    """Load a checkpoint (tensors and plain types only) and check it is from `stage`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {stage} checkpoint at {path}" + (f": run `{hint}` first" if hint else ""))
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated or foreign: say so and how to fix it, not torch's advice
        what = "is empty" if path.stat().st_size == 0 else f"is not a checkpoint this code wrote ({type(e).__name__})"
        fix = f"`{hint} --overwrite`" if hint else "its training command with --overwrite"
        raise UserError(f"{path} {what}: run {fix} to write it again") from None
    if not isinstance(ck, dict) or ck.get("stage") != stage:
        got = ck.get("stage") if isinstance(ck, dict) else type(ck).__name__
        raise UserError(f"{path} is a '{got}' checkpoint, expected '{stage}'" + (f" (made by `{hint}`)" if hint else ""))
    if ck.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint format version {ck.get('version')}, this code reads {VERSION}")
    return ck


def fingerprint(state_dict):
    """sha256 of named tensors' names and bytes: ties a downstream checkpoint to its exact upstream, and a run to
    its training images (train's data_sha)."""
    h = hashlib.sha256()
    for k, t in state_dict.items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


def trained_on_other(ck, **upstream):
    """Names of the upstream checkpoints whose weights are not those `ck` was trained on (the sha256s in its
    "upstream"): trained_on_other(crd_ck, rcae=rcae_ck, dpn=dpn_ck) == ["rcae"] after stage 1 was retrained."""
    ups = ck.get("upstream", {})
    return [k for k, up in upstream.items() if f"{k}_sha" in ups and fingerprint(up["model"]) != ups[f"{k}_sha"]]


CHAIN = {"rcae": ("RcAE", "stage1_rcae.py"), "dpn": ("DPN", "stage2_dpn.py"), "crd": ("CRD", "stage3_crd.py")}


def check_chain(cks, paths, data=None):
    """The one upstream check of the stage chain (stage 3's training, stage3_crd.load_chain): each later
    checkpoint of cks = {"rcae": ck, "dpn": ck, "crd": ck} (pipeline order, any prefix) was trained for the
    RcAE's depth and image size and on the very weights of the earlier ones, now loaded from paths[name]."""
    names = list(cks)
    size, depth = (cks[names[0]]["model_config"].get(k) for k in ("image_size", "depth"))
    for i, name in enumerate(names[1:], start=1):
        cfg, (_, script) = cks[name]["model_config"], CHAIN[name]
        retrain = f"`python {script} --data {data or 'PATH'} --overwrite`"
        if cfg.get("depth", depth) != depth or cfg.get("image_size", size) != size:
            raise UserError(f"{paths[name]} was trained for depth {cfg.get('depth')} at {cfg.get('image_size')}px, "
                            f"the RcAE {paths[names[0]]} for depth {depth} at {size}px: retrain it with {retrain}")
        bad = trained_on_other(cks[name], **{k: cks[k] for k in names[:i]})
        if bad:
            raise UserError(f"{paths[name]} was trained on the {CHAIN[bad[0]][0]} {cks[name]['upstream'][bad[0]]}, not "
                            f"on the weights in {paths[bad[0]]} (an upstream stage was retrained): pass the matching "
                            f"--{bad[0]}, or retrain it with {retrain}")


def n_params(model):
    """Number of parameters of a model (printed by every stage, reported by evaluate and the benchmarks)."""
    return sum(p.numel() for p in model.parameters())


def check_upstream_unchanged(ckpt_path, stage, upstream, args):
    """A run resumed (or found finished) on disk must have been trained on the same upstream weights."""
    if args.overwrite or not Path(ckpt_path).is_file():
        return
    old = load_checkpoint(ckpt_path, stage).get("upstream", {})
    changed = [k for k, v in upstream.items() if k.endswith("_sha") and old.get(k) != v]
    if changed:
        raise UserError(f"{ckpt_path} was trained on other upstream weights ({', '.join(changed)} differ: "
                        f"an upstream stage was retrained): pass --overwrite to train this stage again")


def config_defaults(model):
    """{field: default} of a model's Config dataclass ({} if it has none): what an older checkpoint, written
    before a field existed, means by leaving it out (build_from_checkpoint fills the same defaults)."""
    cfg = getattr(model, "cfg", None)
    return {f.name: f.default for f in fields(cfg)} if is_dataclass(cfg) else {}


def build_from_checkpoint(ck, model_cls, config_cls):
    """Rebuild a model from its checkpoint alone (no flags needed)."""
    names = {f.name for f in fields(config_cls)}
    model = model_cls(config_cls(**{k: v for k, v in ck["model_config"].items() if k in names}))
    model.load_state_dict(ck["model"])
    return model


def freeze(model):
    """Upstream stages pass forward frozen: eval mode, no gradients."""
    return model.eval().requires_grad_(False)


def inherit(args, upstream, keys, source):
    """None = inherit the upstream value; an explicit different value is refused (nanochat's rule)."""
    for k in keys:
        mine, up = getattr(args, k), upstream.get(k, BEFORE_FLAG.get(k))
        if mine is None:
            setattr(args, k, up)
        elif mine != up:
            raise UserError(f"--{k} {mine} conflicts with {source} (trained with {k}={up}): drop --{k} "
                            f"to inherit it, or retrain that stage with --{k} {mine}")


# ----------------------------------------------------------------------------- training loop


def stream_seed(stream, seed, step):
    """The seed of one step's augmentation generator: a hash of (stream, seed, step), so each stage (stream =
    its name) and the validation draw their own pseudo anomalies, never another's."""
    return int.from_bytes(hashlib.sha256(f"{stream}/{seed}/{step}".encode()).digest()[:8], "little") >> 1


class Batches(torch.utils.data.Dataset):
    """Item i is the batch of optimiser step start + i, a pure function of (stream, seed, step).

    Images are drawn as one stream of per-epoch permutations, so a resumed run sees exactly the batches
    the interrupted one would have, and any number of workers gives the same data. The augmentation's
    generator is seeded per stream: stage 3 never trains on the pseudo anomalies stage 1 was fitted to remove."""

    def __init__(self, images, batch_size, seed, start, total, make_batch, stream=""):
        self.images, self.bs, self.seed, self.stream = images, batch_size, seed, stream
        self.start, self.total, self.make_batch = start, total, make_batch

    def __len__(self):
        return self.total - self.start

    def _perm(self, epoch):
        return torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __getitem__(self, i):
        step, m = self.start + i, len(self.images)
        pos = torch.arange(step * self.bs, (step + 1) * self.bs)
        idx = torch.cat([self._perm(e)[pos[pos // m == e] % m] for e in (pos // m).unique().tolist()])
        gen = torch.Generator().manual_seed(stream_seed(self.stream, self.seed, step))
        return self.make_batch(to_float(self.images[idx]), gen)  # dict of CPU tensors


def total_steps(args, n_images):
    steps = args.epochs * math.ceil(n_images / args.batch_size)
    return steps if args.max_steps is None else min(steps, args.max_steps)


def _validate(validate, model, step, log, extra):
    """One validation pass in eval mode; the result goes to the log, the progress output and the checkpoint."""
    model.eval()
    with torch.no_grad():
        val = {k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in validate(model).items()}
    model.train()
    log.write(json.dumps({"step": step, "val": val}) + "\n")
    log.flush()
    extra["val"] = val
    tqdm_write = " ".join(f"{k}={v}" for k, v in val.items() if isinstance(v, float))
    print(f"\n  val @ step {step}: {tqdm_write}")


def _config_diff(a, b):
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


# the flags a run may change when it continues: where things are (train compares the images themselves), how long
# it trains, on what hardware, how often it reports, and stage 3's calibration (redone after every run); every other
# flag shapes what is trained
RESUME_FREE = {"data", "out", "workers", "recipe", "epochs", "max_steps", "max_minutes", "device", "amp", "compile",
               "save_every", "save_every_min", "log_every", "val_every", "overwrite", "rcae", "dpn", "topk_frac",
               "threshold_quantile"}


def _training_diff(saved, args):
    """The flags (other than RESUME_FREE) whose value differs from a checkpoint's: the pseudo anomalies, the lr,
    the seed, the loss... A flag the checkpoint does not know was not there when it was trained: compared as what
    that run did where BEFORE_FLAG knows it (as benchmarks.revalidate reads old checkpoints), skipped otherwise."""
    then = {**BEFORE_FLAG, **saved}
    now = {k: v for k, v in plain(vars(args)).items() if k in then and k not in RESUME_FREE}
    return _config_diff({k: then[k] for k in now}, now)


def adam(params, lr):
    """The optimiser of every RcAE stage: Adam with the paper's settings ("Training Setup")."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def train(*, stage, model, model_config, args, images, make_batch, loss_fn, ckpt_path, extra=None, lr_at=None,
          validate=None):
    """The one training loop of all stages.

    images: (M, C, H, W) uint8 training images; make_batch(x (B, C, H, W) float, gen) -> dict of
    tensors; loss_fn(net, batch on device) -> (total, parts dict). Adam with the paper's settings;
    lr_at(step, total) -> multiplier of args.lr for optimiser step `step` (1-based); default: that of
    --lr_schedule (constant, as in RcAE, unless it says otherwise). validate(model) -> dict of numbers, on
    data kept out of training (never the test split), runs every --val_every steps and at the end: logged
    as {"step", "val"} and kept in the checkpoint under "val". With --ema the average of the weights is what
    is validated and what a finished run saves as "model" and leaves in `model`; an unfinished one keeps the
    raw weights as "model" and the average as "ema" (resuming continues both).
    Resumes from ckpt_path when it holds an unfinished run with the same model_config, the same flags (all
    but RESUME_FREE) and the same training images (their sha256, "data_sha"). Stops on a non-finite loss, keeping
    the last good checkpoint. Returns the final checkpoint dict."""
    device = get_device(args.device)
    model.to(device)
    opt = adam([p for p in model.parameters() if p.requires_grad], args.lr)
    total, start = total_steps(args, len(images)), 0
    lr_at = lr_at or LR_SCHEDULES[getattr(args, "lr_schedule", "constant")]
    cfg = plain(model_config)
    data_sha = fingerprint({"images": images})  # the very images trained on, however --data is spelt
    if Path(ckpt_path).is_file() and not args.overwrite:
        ck = load_checkpoint(ckpt_path, stage)
        saved = {**config_defaults(model), **ck["model_config"]}  # a field added since: its default, as when rebuilt
        diff = _config_diff(saved, cfg) or _training_diff(ck.get("args", {}), args)
        if diff:
            raise UserError(f"{ckpt_path} was trained with other settings ({diff}): "
                            f"pass --overwrite to start over, or another --out")
        if ck.get("data_sha", data_sha) != data_sha:  # a checkpoint written before data_sha: not checked
            raise UserError(f"{ckpt_path} was trained on other images than --data {args.data} gives now (another "
                            f"folder, or its files changed): pass --overwrite to start over, or another --out")
        model.load_state_dict(ck["model"])
        if ck["step"] >= total:
            print(f"{stage}: {ckpt_path} is already trained ({ck['step']} steps); nothing to do "
                  f"(raise --epochs/--max_steps to continue, --overwrite to start over)")
            return ck
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        else:
            print(f"{stage}: continuing a finished run with a fresh optimiser state")
        start = ck["step"]
        print(f"{stage}: resuming from step {start} of {total} ({ckpt_path})")
    decay = getattr(args, "ema", 0.0)
    ema = EMA(model, decay, ck.get("ema") if start else None) if decay else None
    final = ema.model if ema else model  # the weights validated and saved by a finished run
    extra = dict(extra or {}, data_sha=data_sha)
    net = torch.compile(model) if args.compile else model

    def save(step):  # a finished run drops the optimiser state (it can triple the file); resuming keeps it
        state = dict(optimizer=opt.state_dict()) if step < total else {}
        if step < total and ema:  # resuming continues the average too
            state["ema"] = ema.model.state_dict()
        save_checkpoint(ckpt_path, stage, model if step < total else final, cfg, args, step, total_steps=total,
                        **state, **extra)

    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(
        Batches(images, args.batch_size, args.seed, start, total, make_batch, stream=stage), batch_size=None,
        num_workers=(0 if device.type == "cpu" else 4) if args.workers is None else args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False)
    log_path = Path(ckpt_path).with_suffix(".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=(total - start) * args.batch_size, unit="img", desc=stage, dynamic_ncols=True,
               disable=None)
    model.train()
    t0 = last_save = time.time()
    done = saved = start  # the last finished step, the last step on disk (start: nothing new yet)
    stop = []  # a signal asked to stop: the step in flight finishes, its state is saved, then we exit

    def request_stop(signum, frame):
        if stop:  # the second Ctrl-C: stop at once (a step may be half applied: nothing more is saved)
            raise Interrupted(f"interrupted by {signal.Signals(signum).name} twice", signum)
        stop.append(signum)

    in_main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        with open(log_path, "a") as log:
            log.write(json.dumps({"start_step": start, "total_steps": total, "args": plain(args)}) + "\n")
            for step, batch in enumerate(loader, start=start + 1):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, args.amp):
                    loss, parts = loss_fn(net, batch)
                if not torch.isfinite(loss):
                    bar.close()
                    kept = f"the last good checkpoint is kept at {ckpt_path}" if Path(ckpt_path).is_file() \
                        else "no checkpoint was written"
                    raise UserError(f"{stage}: loss is {loss.item()} at step {step}; stopped, {kept}. "
                                    f"Lower --lr (now {args.lr}) and run again")
                if lr_at is not None:
                    for group in opt.param_groups:
                        group["lr"] = args.lr * lr_at(step, total)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema:
                    ema.update(model, step)
                done = step
                bar.update(args.batch_size)
                time_up = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
                if step % args.log_every == 0 or step == total or time_up or stop:
                    parts = {k: round(float(v), 6) for k, v in parts.items()}
                    bar.set_postfix(step=step, loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
                    log.write(json.dumps({"step": step, "loss": loss.item(), **parts,
                                          "img_per_s": round((step - start) * args.batch_size / (time.time() - t0), 2)}) + "\n")
                    log.flush()
                if stop:
                    raise Interrupted(f"interrupted by {signal.Signals(stop[0]).name}", stop[0])
                every_min = args.save_every_min and time.time() - last_save >= 60 * args.save_every_min
                if (step % args.save_every == 0 or every_min) and step < total and not time_up:
                    save(step)
                    saved, last_save = step, time.time()
                if time_up:
                    print(f"\n{stage}: --max_minutes {args.max_minutes} reached at step {step} of {total}")
                    break
                if validate is not None and args.val_every and step % args.val_every == 0 and step < total:
                    _validate(validate, final, step, log, extra)
    except (KeyboardInterrupt, RuntimeError) as e:
        if not isinstance(e, KeyboardInterrupt) and not stop:  # a real error, not a loader worker killed by Ctrl-C
            raise
        bar.close()
        forced = isinstance(e, Interrupted) and "twice" in e.message
        if done > saved and not forced:
            save(done)
            saved = done
        signum = stop[0] if stop else getattr(e, "signum", signal.SIGINT)
        if saved > 0:
            on_disk = f"{ckpt_path} holds step {saved} of {total}; run the same command to resume"
        elif Path(ckpt_path).is_file():
            on_disk = f"no checkpoint of this run yet ({ckpt_path} still holds the run --overwrite replaces)"
        else:
            on_disk = f"no checkpoint yet (nothing written to {ckpt_path}); run the same command to start again"
        raise Interrupted(f"{stage}: interrupted by {signal.Signals(signum).name} after step {done}: {on_disk}",
                          signum, told=True) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    bar.close()
    if ema and done >= total:  # the caller's model holds what a finished run saves (stage 3 calibrates on it)
        model.load_state_dict(ema.model.state_dict())
    if validate is not None:
        with open(log_path, "a") as log:
            _validate(validate, final, done, log, extra)
    save(done)
    print(f"{stage}: {done} steps in {time.time() - t0:.0f}s -> {ckpt_path}")
    release_memory()  # the next work in this process (another stage, evaluation) has other shapes
    return load_checkpoint(ckpt_path, stage)


# ----------------------------------------------------------------------------- synthetic data


def _synthetic_normal(size, gen):
    """A regular texture (woven grid + soft shading + noise) that an autoencoder can learn."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    period = size / 8
    phase = torch.rand(2, generator=gen) * 0.3 * period
    weave = 0.5 + 0.25 * torch.sin(2 * math.pi * (xx + phase[0]) / period) * torch.sin(2 * math.pi * (yy + phase[1]) / period)
    shade = 0.1 * (xx + yy) / (2 * size)
    base = torch.tensor([0.55, 0.45, 0.35])[:, None, None]
    img = base * (weave + shade)[None] + 0.02 * torch.randn(3, size, size, generator=gen)
    return img.clamp(0, 1)


def _synthetic_defect(img, gen):
    """A dark stain or a bright scratch: returns (image, mask)."""
    _, size, _ = img.shape
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy, cx = (0.2 + 0.6 * torch.rand(2, generator=gen)) * size
    if float(torch.rand(1, generator=gen)) < 0.5:
        r = size * (0.06 + 0.08 * float(torch.rand(1, generator=gen)))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2
        colour = torch.tensor([0.1, 0.1, 0.15])[:, None]
    else:
        a = float(torch.rand(1, generator=gen)) * math.pi
        d = (yy - cy) * math.cos(a) - (xx - cx) * math.sin(a)
        along = (yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
        mask = (d.abs() < max(1.0, size / 64)) & (along.abs() < size * 0.25)
        colour = torch.tensor([0.95, 0.95, 0.9])[:, None]
    out = img.clone()
    out[:, mask] = colour
    return out, mask


def _save_png(t, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    a = t if t.dtype == torch.bool else (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)
    Image.fromarray(a.numpy().astype(np.uint8) * (255 if t.dtype == torch.bool else 1)).save(path)


# (normal train, normal test, anomalous test, mask of <stem>, image suffix) of each layout make_synthetic_category writes
SYNTH = {"mvtec": ("train/good", "test/good", "test/defect", "ground_truth/defect/{}_mask.png", ".png"),
         "mpdd": ("train/good", "test/good", "test/defect", "ground_truth/defect/{}_mask.png", ".png"),
         "mvtec_ad2": ("train/good", "test_public/good", "test_public/bad", "test_public/ground_truth/bad/{}_mask.png",
                       ".png"),
         "btad": ("train/ok", "test/ok", "test/ko", "ground_truth/ko/{}.png", ".bmp"),
         "folder": ("good", "good", "defect", "masks/defect/{}.png", ".png")}


def make_synthetic_category(out, size=128, n_train=40, n_test_good=8, n_test_bad=8, seed=0, layout="mvtec",
                            name="toy"):
    """Write a small synthetic category; returns the path to pass as --data.

    layout 'mvtec' (or 'mpdd'): <out>/{train/good, test/good, test/defect, ground_truth/defect}; 'mvtec_ad2',
    'btad' and 'folder' as in SYNTH (a plain folder has one good/: list_samples splits it);
    'visa': <out>/<name>/Data/{Images/{Normal,Anomaly}, Masks/Anomaly} + <out>/split_csv/1cls.csv."""
    if layout not in (*SYNTH, "visa"):
        raise UserError(f"--layout {layout}: choose one of {', '.join((*SYNTH, 'visa'))}")
    out, gen = Path(out), torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_train + n_test_good + n_test_bad):
        img = _synthetic_normal(size, gen)
        split = "train" if i < n_train else "test"
        bad = i >= n_train + n_test_good
        mask = None
        if bad:
            img, mask = _synthetic_defect(img, gen)
        stem = f"{i:03d}"
        if layout != "visa":
            train_dir, good_dir, bad_dir, mask_name, ext = SYNTH[layout]
            _save_png(img, out / (bad_dir if bad else train_dir if split == "train" else good_dir) / f"{stem}{ext}")
            if bad:
                _save_png(mask, out / mask_name.format(stem))
        else:
            kind = "Anomaly" if bad else "Normal"
            image_rel = f"{name}/Data/Images/{kind}/{stem}.JPG"
            _save_png(img, out / image_rel)
            mask_rel = f"{name}/Data/Masks/Anomaly/{stem}.png" if bad else ""
            if bad:
                _save_png(mask, out / mask_rel)
            rows.append(dict(object=name, split=split, label="anomaly" if bad else "normal", image=image_rel,
                             mask=mask_rel))
    if layout == "visa":
        (out / "split_csv").mkdir(parents=True, exist_ok=True)
        with open(out / "split_csv" / "1cls.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
            w.writeheader()
            w.writerows(rows)
        return str(out / name)
    return str(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Shared RcAE plumbing; `synth` writes a synthetic category.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write a small synthetic category in one of the supported layouts")
    s.add_argument("--out", default="data/toy", help="folder to write (the --data of the stages)")
    s.add_argument("--size", type=int, default=128, help="image size in pixels")
    s.add_argument("--n_train", type=int, default=60, help="normal training images")
    s.add_argument("--n_test", type=int, default=20, help="test images of each kind (good, defect)")
    s.add_argument("--layout", choices=[*SYNTH, "visa"], default="mvtec", help="folder layout (README, layouts)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    path = make_synthetic_category(a.out, a.size, a.n_train, a.n_test, a.n_test, a.seed, a.layout)
    print(f"wrote a synthetic category: --data {path}")


if __name__ == "__main__":
    run_main(main)
