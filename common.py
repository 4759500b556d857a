"""Shared plumbing of the three RcAE stages, evaluate.py and the FAIR baseline, in reading order: data (every
supported layout, --resize, decoded once into memory, the holdout), pseudo anomalies (RcAE paper, "Training
Strategy"), the image gradient I' of Eq. (5)-(7) and (9), checkpoints (atomic, self-describing, version-checked),
flags (shared flags, recipes, range checks) and the training loop (progress with images/s and ETA, JSONL log,
resume, NaN guard, Ctrl-C / SIGTERM save). The metrics are in metrics.py, the synthetic category in synth.py."""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VERSION = 2  # checkpoint format; version 1 (before the flags were renamed) is refused with one line
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback (see run_main)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: run_main prints `message` (told: it says what is on disk), exits 128 + signum."""

    def __init__(self, message="interrupted", signum=signal.SIGINT, told=False):
        super().__init__(message)
        self.message, self.signum, self.told = message, signum, told


def _interrupt(signum, frame):
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


def run_main(main):
    """Entry point of every script: user errors become `error: ...` on stderr and exit code 2; Ctrl-C and SIGTERM
    (a cluster's time limit, `kill`) exit 130 / 143 with one line saying what is on disk."""
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
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
    defect: str  # "good" or the defect type (its test folder)


# The tree layouts: (train folder of normal images, test folder with one sub-folder per kind, masks folder, the
# name of the normal kind). Masks are <masks>/<defect>/<stem>_mask.* or <stem>.* (any image suffix).
TREES = {"mvtec": ("train/good", "test", "ground_truth", "good"),  # MVTec AD, MPDD
         "mvtec_ad2": ("train/good", "test_public", "test_public/ground_truth", "good"),
         "btad": ("train/ok", "test", "ground_truth", "ok")}
LAYOUTS = ("MVTec AD / MPDD (train/good, test/<defect>, ground_truth/<defect>), MVTec AD 2 (test_public/), BTAD "
           "(train/ok, test/{ok,ko}), VisA (Data/Images next to ../split_csv/1cls.csv) or a plain folder (good/, ...)")
FOLDER_TEST_FRAC = 0.2  # plain folder: the part of good/ kept for the test split (anomalib's normal_split_ratio)


def detect_layout(root):
    """The layout of a category folder: a key of TREES, 'visa' or 'folder'; a UserError naming them all."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root}: " + ("not a folder (point it at one category, e.g. mvtec/bottle)"
                                              if root.exists() else "no such folder"))
    for layout, found in (("mvtec_ad2", ["test_public"]), ("btad", ["train/ok", "test/ok", "test/ko"]),
                          ("mvtec", ["train", "test"]), ("visa", ["Data/Images"]), ("folder", ["good"])):
        if any((root / d).is_dir() for d in found):
            if layout == "visa" and not (root.parent / "split_csv" / "1cls.csv").is_file():
                raise UserError(f"--data {root} looks like VisA but {root.parent}/split_csv/1cls.csv is missing")
            return layout
    raise UserError(f"--data {root} is not a category in a layout this code reads: {LAYOUTS}")


def images_in(folder):
    """The image files of a folder (not recursive), sorted; [] if it is not a folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()) \
        if folder.is_dir() else []


def list_samples(data, split):
    """The samples of one split ('train' or 'test') of a category, in a fixed (sorted) order."""
    root = Path(data)
    layout = detect_layout(root)
    lister = {"visa": _list_visa, "folder": _list_folder}.get(layout)
    samples = lister(root, split) if lister else _list_tree(root, split, *TREES[layout])
    if not samples:
        where = root / TREES[layout][0] if layout in TREES and split == "train" else root
        raise UserError(f"no {split} images found in {where}")
    return samples


def _with_masks(images, gt, defect):
    """Samples of one anomalous kind with their masks in `gt`, if any; a mask without its image is refused."""
    masks = {m.stem.removesuffix("_mask"): m for m in images_in(gt)}
    stems = {p.stem for p in images}
    for stem, m in sorted(masks.items()):
        if stem not in stems:
            raise UserError(f"mask {m} has no image (expected {defect}/{stem}.* next to the other test images)")
    return [Sample(str(p), str(masks[p.stem]) if p.stem in masks else None, 1, defect) for p in images]


def _list_tree(root, split, train_dir, test_dir, gt_dir, good):
    if split == "train":
        if not (root / train_dir).is_dir():
            raise UserError(f"{root} has no {train_dir} folder of normal training images")
        return [Sample(str(p), None, 0, "good") for p in images_in(root / train_dir)]
    test, gt = root / test_dir, root / gt_dir
    if not test.is_dir():
        raise UserError(f"{root} has no {test_dir} folder")
    samples = []
    for defect in sorted(d.name for d in test.iterdir() if d.is_dir() and d != gt):
        images = images_in(test / defect)
        samples += ([Sample(str(p), None, 0, "good") for p in images] if defect == good
                    else _with_masks(images, gt / defect, defect))
    for d in sorted(gt.iterdir()) if gt.is_dir() else []:
        if d.is_dir() and not (test / d.name).is_dir() and images_in(d):
            raise UserError(f"mask {images_in(d)[0]} has no image (no folder {test / d.name})")
    return samples


def _list_folder(root, split):
    """good/ normal (FOLDER_TEST_FRAC of it test), every other folder but masks/ anomalous, masks/<defect>/ optional."""
    good = images_in(root / "good")
    train, test = holdout_indices(len(good), FOLDER_TEST_FRAC)
    samples = [Sample(str(good[i]), None, 0, "good") for i in (train if split == "train" else test)]
    if split == "test":
        for d in sorted(d for d in root.iterdir() if d.is_dir() and d.name not in ("good", "masks")):
            samples += _with_masks(images_in(d), root / "masks" / d.name, d.name)
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
    for m in images_in(root / "Data" / "Masks" / "Anomaly") if split == "test" else []:
        if str(m.resolve()) not in listed:
            raise UserError(f"mask {m} has no image in the test split of {csv_path}")
    return samples


# --resize, how an image of any aspect ratio becomes the square input: squash (to size x size, changing the aspect
# ratio; the paper's way), pad (the long side to size, the short one padded black) or crop (the short side to size,
# the centre cropped)
RESIZE = ("squash", "pad", "crop")


def placement(h, w, size, resize):
    """Where an (h, w) image lands in the size x size input: resized to (rh, rw), its top-left corner at (top,
    left), negative for crop."""
    if resize == "squash":
        return size, size, 0, 0
    s = size / (max(h, w) if resize == "pad" else min(h, w))
    rh, rw = max(1, round(h * s)), max(1, round(w * s))
    return rh, rw, (size - rh) // 2, (size - rw) // 2


def fit(im, size, resize="squash", resample=Image.BILINEAR):
    """PIL image -> size x size PIL image by `resize` (see RESIZE)."""
    rh, rw, top, left = placement(im.height, im.width, size, resize)
    im = im.resize((rw, rh), resample)
    if (rh, rw) == (size, size):
        return im
    canvas = Image.new(im.mode, (size, size))  # black / False outside the image
    canvas.paste(im, (left, top))  # a negative offset crops
    return canvas


def read_image(path, size=None, resize="squash"):
    """Image file, any PIL mode (L, RGB, RGBA, P, 16-bit, ...) -> (size, size, 3) uint8 RGB by `resize`, bilinear;
    (H, W, 3) at its own size for size=None. Raises on truncated files."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else (255.0 if a.max() > 1 else 1.0)
            im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
        im = (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")
    return np.asarray(im if size is None else fit(im, size, resize), dtype=np.uint8)


def decode(samples, read, size, resize):
    """read(sample, size, resize) and the original (h, w) of each sample, on 4 threads -> (samples, results, sizes);
    an unreadable file is skipped with a warning, non-square images under --resize squash are named once."""
    def safe(sample):
        try:
            with Image.open(sample.path) as im:
                return read(sample, size, resize), (im.height, im.width)
        except (OSError, SyntaxError, ValueError) as e:
            warn(f"skipping unreadable file for {sample.path}: {e}")

    with ThreadPoolExecutor(4) as pool:
        out = [(s, *o) for s, o in zip(samples, pool.map(safe, samples)) if o is not None]
    if not out:
        raise UserError(f"none of the {len(samples)} images in {Path(samples[0].path).parent} could be read")
    wide = [hw for *_, hw in out if hw[0] != hw[1]]
    if resize == "squash" and wide:
        warn(f"{len(wide)} of {len(out)} images in {Path(samples[0].path).parent} are not square and --resize "
             f"squash changes their aspect ratio (e.g. {wide[0]}); --resize pad or crop keeps it")
    return tuple(zip(*out))


@lru_cache(maxsize=8)
def load_train(data, image_size, resize="squash"):
    """train/good decoded once per process into uint8 (M, 3, H, W) (the test split: evaluate.load_test)."""
    _, images, _ = decode(list_samples(data, "train"), lambda s, *a: read_image(s.path, *a), image_size, resize)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def holdout_indices(n, frac):
    """(train_idx, holdout_idx): the holdout is kept out of all training, for validation and the threshold; evenly
    spread over the sorted files, not random, so it is the same for every seed and covers the whole sequence."""
    m = 0 if frac <= 0 or n < 2 else min(n - 1, max(1, round(n * frac)))
    hold = sorted(set(np.linspace(0, n - 1, m).round().astype(int).tolist())) if m else []
    return [i for i in range(n) if i not in set(hold)], hold


def train_images(args, part="train"):
    """uint8 (M, 3, H, W) of train/good: part 'holdout', or 'train', --train_fraction of the rest (paper, Table 5):
    the first round(n * frac) of a fixed permutation, so a smaller fraction lies inside a larger one."""
    images = load_train(args.data, args.image_size, args.resize)
    train, hold = holdout_indices(len(images), args.holdout)
    if part == "holdout":
        return images[hold]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    keep = sorted(order[:max(1, round(len(train) * args.train_fraction))]) if train else []
    return images[[train[i] for i in keep]]


def to_float(x):
    """uint8 (..., C, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255)


# ----------------------------------------------------------------------------- pseudo anomalies


def _blob(size, coverage, gen):
    """An irregular region covering `coverage` of a size x size block: thresholded smooth noise."""
    field = F.interpolate(torch.rand(1, 1, 4, 4, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=False)[0, 0]
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


# --anomaly_size: "scaled" (the paper's 32-128 px blocks and 50-150 px cracks, given for 1024 px, scaled by H/1024)
# or "relative" (4x that: 1/8-1/2 of the image, DRAEM-like). --anomaly_colour: "uniform" U[0, 1] (paper: not given)
# or "image", the same draws mapped into each channel's [min, max] of the image: no pseudo anomaly is brighter or
# darker than all of its image (on a dark category most uniform colours are, a cue no real defect gives).
ANOMALY_SIZES = {"scaled": 1, "relative": 4}
COLOURS = ("uniform", "image")
MIN_VISIBLE = 0.5  # a masked pixel changed by more than this fraction of the image's intensity std


def pseudo_anomaly(img, gen, size_mode="scaled", colours="uniform", max_blocks=3, block_sizes=(32, 64, 128)):
    """Pseudo anomalies on one image (paper, "Training Strategy"): img (C, H, W) in [0, 1], gen the only source of
    randomness. Each of 1..max_blocks random blocks (32, 64 or 128 px at 1024 px, ANOMALY_SIZES) inside the image
    gets a random colour blended at U[0.5, 1] over a region covering 5-100% of it, a copy of another block pasted
    over such a region, or a crack of 1-4 lines of 50-150 px in one colour (gray on a gray image). -> (image, mask
    (1, H, W) float: the changed pixels that changed by more than MIN_VISIBLE x the image's std, at least 1/255)."""
    if colours not in COLOURS or size_mode not in ANOMALY_SIZES:
        raise ValueError(f"pseudo_anomaly: sizes are {list(ANOMALY_SIZES)}, colours {COLOURS}: not {size_mode}, {colours}")
    c, h, w = img.shape
    scale = ANOMALY_SIZES[size_mode] * h / 1024
    gray = bool((img == img[:1]).all())
    lo, hi = img.amin((1, 2)), img.amax((1, 2))  # (C,) each channel's range in this image

    def colour(*shape):  # (C, *shape): a random colour, the same in every channel of a gray image
        v = torch.rand(1 if gray else c, *shape, generator=gen)
        v = v.expand(c, *shape) if gray else v
        if colours == "image":  # the same draw mapped into the image's range
            v = lo.view(c, *[1] * len(shape)) + (hi - lo).view(c, *[1] * len(shape)) * v
        return v

    out, region = img.clone(), torch.zeros(h, w, dtype=torch.bool)
    for _ in range(int(torch.randint(1, max_blocks + 1, (1,), generator=gen))):
        s = min(h, w, max(4, round(block_sizes[int(torch.randint(len(block_sizes), (1,), generator=gen))] * scale)))
        y = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        kind = ("colour", "paste", "crack")[int(torch.randint(3, (1,), generator=gen))]
        if kind == "crack":  # crack-like random lines in one random colour
            m = _crack(h, w, y + s / 2, x + s / 2, scale, gen)
            out[:, m] = colour(1)
            region |= m
            continue
        m = _blob(s, 0.05 + 0.95 * float(torch.rand(1, generator=gen)), gen)
        block = out[:, y:y + s, x:x + s]
        if kind == "colour":  # a random colour, blended at alpha ~ U[0.5, 1]
            a = 0.5 + 0.5 * float(torch.rand(1, generator=gen))
            patch = (1 - a) * block + a * colour(1, 1)
        else:  # copy & paste a patch from elsewhere in the same image
            sy = int(torch.randint(0, h - s + 1, (1,), generator=gen))
            sx = int(torch.randint(0, w - s + 1, (1,), generator=gen))
            patch = img[:, sy:sy + s, sx:sx + s]
        block[:, m] = patch[:, m]
        region[y:y + s, x:x + s] |= m
    visible = (out - img).abs().amax(0) > max(1 / 255, MIN_VISIBLE * float(img.std()))  # (H, W)
    return out, (region & visible)[None].float()


def augment_batch(x, gen, prob, size_mode="scaled", colours="uniform"):
    """Pseudo anomalies on each image of x (B, C, H, W) with probability `prob` -> (images, masks (B, 1, H, W))."""
    out, masks = x.clone(), torch.zeros_like(x[:, :1])
    for i in range(len(x)):
        if float(torch.rand(1, generator=gen)) < prob:
            out[i], masks[i] = pseudo_anomaly(x[i], gen, size_mode, colours)
    return out, masks


# ----------------------------------------------------------------------------- image gradient


def image_gradient(x):
    """The first-order image gradient I' of Eq. (5), (6), (7), (9): forward differences, zero past the border.
    (B, C, H, W) -> (B, 2C, H, W) as [d/dx, d/dy]."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))  # (B, C, H, W)
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))  # (B, C, H, W)
    return torch.cat([dx, dy], dim=1)


def conv_cat(conv, *parts):
    """conv(torch.cat(parts, 1)) for an nn.Conv2d/Conv3d as the sum of one conv per part (B, c_i, ...) over its
    slice of the weight: equal up to rounding, without the concat's copy (x1.25-1.4 per step, benchmarks/README.md)."""
    out, i = None, 0
    for p in parts:
        y = conv._conv_forward(p, conv.weight[:, i:i + p.shape[1]], conv.bias if i == 0 else None)
        out, i = y if out is None else out + y, i + p.shape[1]
    if i != conv.in_channels:
        raise ValueError(f"conv_cat: the parts have {i} channels, the conv takes {conv.in_channels}")
    return out


# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """A temp file beside `path` that replaces it on a clean exit (readers see the old file or the new one, never
    half of one) and is removed on an error or Ctrl-C."""
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
    """nan -> None (null; json.dumps would write NaN, which is not JSON) through dicts and lists."""
    if isinstance(v, (dict, list, tuple)):
        return {k: json_safe(x) for k, x in v.items()} if isinstance(v, dict) else [json_safe(x) for x in v]
    return (None if math.isnan(v) else float(v)) if isinstance(v, (float, np.floating)) else v


def write_json(path, obj):
    """Every JSON result file of the project: atomic, nan as null, one key per line."""
    write_text(path, json.dumps(json_safe(obj), indent=1))


def plain(d):
    """argparse namespace / dict -> dict of plain types (weights_only-loadable)."""
    d = vars(d) if isinstance(d, argparse.Namespace) else dict(d)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def save_checkpoint(path, stage, model, model_config, args, step, **extra):
    """Atomic write of a self-describing checkpoint: {stage, model (state_dict), model_config, args, step, version,
    **extra}, tensors and plain types only (loads with weights_only=True)."""
    ck = dict(stage=stage, model=model.state_dict(), model_config=plain(model_config), args=plain(args), step=step,
              version=VERSION, **extra)
    with atomic_open(path, "wb") as f:
        torch.save(ck, f)


def load_checkpoint(path, stage, hint=""):
    """Load a checkpoint (tensors and plain types only), checking its stage and format version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {stage} checkpoint at {path}" + (f": run `{hint}` first" if hint else ""))
    fix = f"`{hint} --overwrite`" if hint else "its training command with --overwrite"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated or foreign: say so and how to fix it, not torch's advice
        what = "is empty" if path.stat().st_size == 0 else f"is not a checkpoint this code wrote ({type(e).__name__})"
        raise UserError(f"{path} {what}: run {fix} to write it again") from None
    if not isinstance(ck, dict) or ck.get("stage") != stage:
        got = ck.get("stage") if isinstance(ck, dict) else type(ck).__name__
        raise UserError(f"{path} is a '{got}' checkpoint, expected '{stage}'" + (f" (made by `{hint}`)" if hint else ""))
    if ck.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint format version {ck.get('version')}, this code reads {VERSION}: "
                        f"retrain it with {fix}, or load it with the code of commit 0ef5131")
    return ck


def build_from_checkpoint(ck, model_cls, config_cls):
    """Rebuild a model from its checkpoint alone (no flags needed), frozen."""
    model = model_cls(config_cls(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval().requires_grad_(False)  # upstream stages pass forward frozen


def fingerprint(state_dict):
    """sha256 of named tensors: ties a checkpoint to its exact upstream weights and its training images."""
    h = hashlib.sha256()
    for k, t in state_dict.items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- flags


# --recipe: the defaults it changes per stage (explicit flags still win). "paper": the paper's settings (1024 px, lr
# 1e-4, 1500 / 400 / 300 epochs: days on a CPU); "cpu": what works at a CPU's budget (docs/reading_the_paper.md).
RECIPES = {"paper": {},
           "cpu": {"stage1_rcae": dict(image_size=128, lr=1e-3, max_steps=1758, updown_init="pca", ema=0.99,
                                       anomaly_colour="image"),
                   "stage2_dpn": dict(lr=1e-3, max_steps=263),
                   "stage3_crd": dict(lr=1e-3, max_steps=258, crd_input="residual", residual_scale="position",
                                      loss="focal", init_prior=0.01, anomaly_size="relative", anomaly_colour="image")}}
INHERITED = ("image_size", "depth", "holdout", "resize", "train_fraction")  # stages 2-3 take these from stage 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default printed once: not where the help already names it, nor where it is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() or action.default is None else super()._get_help_string(action)


def add_shared_args(p, first=True, paper="paper", recipes=True, **d):
    """The shared flags in the groups data / model / loss / optimisation / run, returned for the stage's own flags.
    d: this stage's values in its `paper`. first=False (stages 2-3): no INHERITED flags, they come from the stage-1
    checkpoint. recipes=False (FAIR): no --recipe and no --depth."""
    g = {k: p.add_argument_group(k) for k in ("data", "model", "loss", "optimisation", "run")}
    g["data"].add_argument("--data", required=True, help="category folder in a supported layout (README): MVTec AD "
                                                         "(e.g. mvtec/bottle), MVTec AD 2, BTAD, MPDD, VisA, plain")
    g["data"].add_argument("--out", help="output folder (default: runs/<parent>/<category>)")
    if first:
        g["data"].add_argument("--image_size", type=int, default=d.get("image_size", 1024),
                               help=f"square input size (default: %(default)s, as in the {paper})")
        g["data"].add_argument("--resize", choices=RESIZE, default="squash",
                               help="non-square images: squash (as the paper), pad (letterbox) or crop (centre)")
        g["data"].add_argument("--holdout", type=float, default=0.1, help="fraction of train/good kept out of "
                               "training for validation and the threshold (paper: none)")
        g["data"].add_argument("--train_fraction", type=float, default=1.0,
                               help="train on this fixed fraction of what the holdout leaves (paper, Table 5)")
    if first and recipes:
        g["model"].add_argument("--depth", type=int, default=5, help="recursion depth N (default: 5, as in the paper)")
    o = g["optimisation"]
    o.add_argument("--epochs", type=int, default=d["epochs"], help=f"passes over the training images "
                                                                  f"(default: %(default)s, as in the {paper})")
    o.add_argument("--max_steps", type=int, help="cap on optimiser steps (default: none; the cpu recipe sets one)")
    o.add_argument("--batch_size", type=int, default=8, help=f"images per step ({paper}: {d.get('batch', 'not given')})")
    o.add_argument("--lr", type=float, default=1e-4, help=f"Adam learning rate (default: 1e-4, betas 0.9/0.999, "
                                                          f"as in the {paper})")
    r = g["run"]
    if recipes:
        r.add_argument("--recipe", choices=sorted(RECIPES), default="paper", help="named defaults: paper (the "
                       "paper's settings) or cpu (what works at a CPU's budget); explicit flags override it")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    r.add_argument("--seed", type=int, default=0, help="seed of weights, batches and augmentation")
    r.add_argument("--amp", type=int, default=1, help="bf16 autocast on CUDA (1/0); ignored on CPU")
    r.add_argument("--compile", type=int, default=0, help="torch.compile the trained network (1/0)")
    r.add_argument("--save_every", type=int, default=500, help="checkpoint and validate every this many steps "
                   f"(also every {SAVE_MINUTES} minutes, at the end and on Ctrl-C)")
    r.add_argument("--overwrite", action="store_true", help="start over even if <out> has a checkpoint")
    return g


def add_anomaly_args(g, prob_help):
    """The pseudo-anomaly flags of stages 1 and 3, into group g."""
    g.add_argument("--anomaly_prob", type=float, default=0.5, help=prob_help)
    g.add_argument("--anomaly_size", choices=list(ANOMALY_SIZES), default="scaled", help="pseudo-anomaly sizes: "
                   "scaled (the paper's 32-128 px blocks at 1024 px, scaled with the image) or relative (4x that)")
    g.add_argument("--anomaly_colour", choices=COLOURS, default="uniform", help="colours of colour blocks and "
                   "cracks: uniform (U[0, 1]; paper: not given) or image (within the image's own range per channel)")


# The ranges check_flags knows: rule -> (test, what the error says)
RANGES = {">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"), ">=1": (lambda v: v >= 1, ">= 1"),
          "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"), "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
          "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"), "0/1": (lambda v: v in (0, 1), "0 or 1"),
          "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"), "odd": (lambda v: v >= 1 and v % 2, "an odd number >= 1")}


def check_flags(args, **rules):
    """check_flags(args, lr=">0") -> UserError "--lr must be > 0 (got -1.0)"; None passes, nan and inf never do."""
    for k, rule in rules.items():
        v = getattr(args, k, None)
        test, what = RANGES[rule]
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None and not (math.isfinite(x) and test(x)):
                raise UserError(f"--{k} must be {what} (got {v})")


def check_size(image_size, depth):
    k = 2 ** depth
    if image_size < k or image_size % k:
        raise UserError(f"--image_size {image_size} cannot be halved {depth} times (--depth {depth}): "
                        f"use a multiple of {k}, e.g. {max(k, round(image_size / k) * k)}")


def default_out(data):
    """runs/<parent>/<category>: mvtec/bottle -> runs/mvtec/bottle."""
    p = Path(data).resolve()
    return str(Path("runs") / p.parent.name / p.name)


def parse_args(p, argv, stage=None):
    """Parse a stage's flags: the --recipe's defaults first, then what was given explicitly; validated."""
    args = p.parse_args(argv)
    recipe = RECIPES[getattr(args, "recipe", "paper")].get(stage, {})
    if recipe:
        unknown = set(recipe) - set(vars(args))  # set_defaults would take a misspelt flag silently
        assert not unknown, f"RECIPES[{args.recipe!r}][{stage!r}] names flags {stage} does not have: {sorted(unknown)}"
        p.set_defaults(**recipe)
        args = p.parse_args(argv)
    args.out = args.out or default_out(args.data)
    check_flags(args, image_size=">=1", depth=">=1", epochs=">=1", batch_size=">=1", max_steps=">=0", lr=">0",
                seed="seed", amp="0/1", compile="0/1", save_every=">=1", holdout="[0,1)", train_fraction="(0,1]",
                ema="[0,1)", anomaly_prob="[0,1]", width=">=1")
    if getattr(args, "image_size", None):
        check_size(args.image_size, getattr(args, "depth", 0))
    return args


def get_device(name="auto"):
    """The torch device for --device. Also flushes denormal floats to zero on the CPU, where CRD's near-saturated
    maps otherwise produce denormals that slow every step down many times over."""
    torch.set_flush_denormal(True)
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = "cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


AMP_DEVICE_TYPES = ("cuda",)  # where --amp 1 autocasts: bf16 on the CPU was slower (x0.68, benchmarks/README.md)


def autocast(device, enabled=True):
    """The one AMP pattern, for training losses and inference alike: bf16 autocast on CUDA, a no-op elsewhere
    (a test adds "cpu" to AMP_DEVICE_TYPES to run the same bf16 path on the CPU)."""
    on = bool(enabled) and device.type in AMP_DEVICE_TYPES
    return torch.autocast(device.type if on else "cuda", dtype=torch.bfloat16, enabled=on)


# ----------------------------------------------------------------------------- training loop


def stream_seed(stream, seed, step):
    """The seed of one step's augmentation generator, a hash of (stream, seed, step): each stage (stream = its
    name) and the validation draw their own pseudo anomalies, never another's."""
    return int.from_bytes(hashlib.sha256(f"{stream}/{seed}/{step}".encode()).digest()[:8], "little") >> 1


class Batches(torch.utils.data.Dataset):
    """Item i is the batch of optimiser step start + i, a pure function of (stream, seed, step) drawn from one stream
    of per-epoch permutations: a resumed run sees the batches the interrupted one would have, with any workers."""

    def __init__(self, images, batch_size, seed, start, total, make_batch, stream=""):
        self.images, self.bs, self.seed, self.stream = images, batch_size, seed, stream
        self.start, self.total, self.make_batch = start, total, make_batch

    def __len__(self):
        return self.total - self.start

    def __getitem__(self, i):
        step, m = self.start + i, len(self.images)
        pos = torch.arange(step * self.bs, (step + 1) * self.bs)
        perm = lambda e: torch.randperm(m, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))  # noqa
        idx = torch.cat([perm(e)[pos[pos // m == e] % m] for e in (pos // m).unique().tolist()])
        gen = torch.Generator().manual_seed(stream_seed(self.stream, self.seed, step))
        return self.make_batch(to_float(self.images[idx]), gen)  # dict of CPU tensors


# what a run may change when it continues: paths, length, hardware, saving, stage 3's calibration (redone anyway)
RESUME_FREE = {"data", "out", "recipe", "epochs", "max_steps", "device", "amp", "compile", "save_every", "overwrite",
               "rcae", "dpn", "topk_frac", "threshold_quantile"}
SAVE_MINUTES, LOG_EVERY = 5, 10  # also checkpoint after this many minutes; log the loss parts every this many steps


def _resume(ckpt_path, stage, model, cfg, args, extra):
    """The checkpoint to continue, or None: it must have the same model_config, flags (but RESUME_FREE), training
    images and upstream weights, else a UserError says what differs."""
    if args.overwrite or not Path(ckpt_path).is_file():
        return None
    ck = load_checkpoint(ckpt_path, stage)
    now = {k: v for k, v in plain(args).items() if k not in RESUME_FREE}
    then = {**{k: ck["args"].get(k) for k in now}, **ck["model_config"]}
    diff = ", ".join(f"{k}: {then[k]} vs {v}" for k, v in {**now, **cfg}.items() if then.get(k) != v)
    if diff:
        raise UserError(f"{ckpt_path} was trained with other settings ({diff}): "
                        f"pass --overwrite to start over, or another --out")
    if ck["data_sha"] != extra["data_sha"]:
        raise UserError(f"{ckpt_path} was trained on other images than --data {args.data} gives now (another "
                        f"folder, or its files changed): pass --overwrite to start over, or another --out")
    changed = [k for k, v in ck.get("upstream", {}).items() if k.endswith("_sha") and extra["upstream"][k] != v]
    if changed:
        raise UserError(f"{ckpt_path} was trained on other upstream weights ({', '.join(changed)} differ: an upstream "
                        f"stage was retrained): pass --overwrite to train this stage again")
    model.load_state_dict(ck["model"])
    return ck


def train(*, stage, model, model_config, args, images, make_batch, loss_fn, ckpt_path, extra=None, lr_at=None,
          validate=None, ema=None):
    """The one training loop of all stages: images (M, C, H, W) uint8; make_batch(x (B, C, H, W) float, gen) ->
    batch dict; loss_fn(net, batch) -> (total, parts). Adam as in the paper ("Training Setup"); lr_at(step, total)
    multiplies --lr at step `step` (1-based; constant if None, as in the paper). validate(model) -> dict of numbers on
    the holdout (never the test split), every --save_every steps and at the end, logged and kept as "val". With an
    ema (stage 1's EMA) the average is what is validated and what a finished run saves and leaves in `model`.
    Resumes an unfinished run (_resume); stops on a non-finite loss. Returns the final checkpoint."""
    from tqdm import tqdm
    device = get_device(args.device)
    model.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], args.lr, (0.9, 0.999), 1e-8)
    total = args.epochs * math.ceil(len(images) / args.batch_size)
    total = total if args.max_steps is None else min(total, args.max_steps)
    cfg, extra = plain(model_config), dict(extra or {}, data_sha=fingerprint({"images": images}))  # the very images
    ck, start = _resume(ckpt_path, stage, model, cfg, args, extra), 0
    if ck and ck["step"] >= total:
        print(f"{stage}: {ckpt_path} is already trained ({ck['step']} steps); nothing to do "
              f"(raise --epochs/--max_steps to continue, --overwrite to start over)")
        return ck
    if ck:
        opt.load_state_dict(ck["optimizer"]) if "optimizer" in ck else print(f"{stage}: fresh optimiser state")
        start = ck["step"]
        print(f"{stage}: resuming from step {start} of {total} ({ckpt_path})")
    if ema and ck:  # resuming continues the average (a finished run's weights are the average)
        ema.model.load_state_dict(ck.get("ema", ck["model"]))
    final = ema.model.to(device) if ema else model  # the weights validated and saved by a finished run
    net = torch.compile(model) if args.compile else model

    def save(step):  # a finished run drops the optimiser state (it can triple the file); resuming keeps it
        state = dict(optimizer=opt.state_dict(), **({"ema": ema.model.state_dict()} if ema else {}))
        save_checkpoint(ckpt_path, stage, model if step < total else final, cfg, args, step, total_steps=total,
                        **(state if step < total else {}), **extra)

    def check(step):  # validation: logged, printed, kept in the checkpoint
        final.eval()
        with torch.no_grad():
            extra["val"] = {k: round(float(v), 6) for k, v in validate(final).items()}
        final.train()
        log.write(json.dumps({"step": step, "val": extra["val"]}) + "\n")
        print(f"\n  val @ step {step}: " + " ".join(f"{k}={v}" for k, v in extra["val"].items()))

    def request_stop(signum, frame):  # the step in flight finishes, its state is saved, then the loop exits
        if stop:  # the second Ctrl-C: stop at once (a step may be half applied: nothing more is saved)
            raise Interrupted(f"interrupted by {signal.Signals(signum).name} twice", signum)
        stop.append(signum)

    loader = torch.utils.data.DataLoader(Batches(images, args.batch_size, args.seed, start, total, make_batch, stage),
                                         batch_size=None, num_workers=0 if device.type == "cpu" else 4,
                                         pin_memory=device.type == "cuda")
    Path(ckpt_path).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=(total - start) * args.batch_size, unit="img", desc=stage, dynamic_ncols=True, disable=None)
    model.train()
    t0 = last_save = time.time()
    done = saved = start  # the last finished step, the last step on disk
    stop = []
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    with open(Path(ckpt_path).with_suffix(".log.jsonl"), "a", buffering=1) as log:  # line-buffered
        log.write(json.dumps({"start_step": start, "total_steps": total, "args": plain(args)}) + "\n")
        try:
            for step, batch in enumerate(loader, start=start + 1):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, args.amp):
                    loss, parts = loss_fn(net, batch)
                if not torch.isfinite(loss):
                    kept = f"the last good checkpoint is kept at {ckpt_path}" if saved else "no checkpoint was written"
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
                if step % LOG_EVERY == 0 or step == total or stop:
                    parts = {k: round(float(v), 6) for k, v in parts.items()}
                    bar.set_postfix(step=step, loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
                    rate = round((step - start) * args.batch_size / (time.time() - t0), 2)
                    log.write(json.dumps({"step": step, "loss": loss.item(), **parts, "img_per_s": rate}) + "\n")
                if stop:
                    raise Interrupted(f"interrupted by {signal.Signals(stop[0]).name}", stop[0])
                if step < total and (step % args.save_every == 0 or time.time() - last_save >= 60 * SAVE_MINUTES):
                    save(step)
                    saved, last_save = step, time.time()
                if validate is not None and step % args.save_every == 0 and step < total:
                    check(step)
        except (KeyboardInterrupt, RuntimeError) as e:
            if not isinstance(e, KeyboardInterrupt) and not stop:  # a real error, not a worker killed by Ctrl-C
                raise
            if done > saved and not (isinstance(e, Interrupted) and "twice" in e.message):
                save(done)
                saved = done
            on_disk = (f"{ckpt_path} holds step {saved} of {total}; run the same command to resume" if saved else
                       "nothing of this run was saved; run the same command to start again")
            signum = stop[0] if stop else getattr(e, "signum", signal.SIGINT)
            raise Interrupted(f"{stage}: interrupted by {signal.Signals(signum).name} after step {done}: {on_disk}",
                              signum, told=True) from None
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if ema and done >= total:  # the caller's model holds what a finished run saves (stage 3 calibrates on it)
            model.load_state_dict(ema.model.state_dict())
        if validate is not None:
            check(done)
    save(done)
    print(f"{stage}: {done} steps in {time.time() - t0:.0f}s -> {ckpt_path}")
    return load_checkpoint(ckpt_path, stage)
