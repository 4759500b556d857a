"""A small synthetic category in any supported layout, for the quick start and the tests (nothing to download):
a woven texture with soft shading and noise; the anomalous test images carry a dark stain or a bright scratch,
with its mask.

    python synth.py --out data/toy --size 64              # MVTec AD layout: train/good, test/{good,defect}, ...
    python synth.py --out data/visa --layout visa         # VisA: <out>/toy/Data/... and <out>/split_csv/1cls.csv
"""
import argparse
import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common

# (normal train, normal test, anomalous test, mask of <stem>, image suffix) of each layout
LAYOUTS = {"mvtec": ("train/good", "test/good", "test/defect", "ground_truth/defect/{}_mask.png", ".png"),
           "mpdd": ("train/good", "test/good", "test/defect", "ground_truth/defect/{}_mask.png", ".png"),
           "mvtec_ad2": ("train/good", "test_public/good", "test_public/bad",
                         "test_public/ground_truth/bad/{}_mask.png", ".png"),
           "btad": ("train/ok", "test/ok", "test/ko", "ground_truth/ko/{}.png", ".bmp"),
           "folder": ("good", "good", "defect", "masks/defect/{}.png", ".png"),
           "visa": ("toy/Data/Images/Normal", "toy/Data/Images/Normal", "toy/Data/Images/Anomaly",
                    "toy/Data/Masks/Anomaly/{}.png", ".JPG")}


def synthetic_image(size, gen, defect=False):
    """-> (image (3, size, size) in [0, 1], mask (size, size) bool, or None for a normal image)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    period = size / 8
    phase = torch.rand(2, generator=gen) * 0.3 * period
    weave = 0.5 + 0.25 * torch.sin(2 * math.pi * (xx + phase[0]) / period) * torch.sin(2 * math.pi * (yy + phase[1])
                                                                                        / period)
    img = torch.tensor([0.55, 0.45, 0.35])[:, None, None] * (weave + 0.1 * (xx + yy) / (2 * size))[None]
    img = (img + 0.02 * torch.randn(3, size, size, generator=gen)).clamp(0, 1)
    if not defect:
        return img, None
    cy, cx = (0.2 + 0.6 * torch.rand(2, generator=gen)) * size
    if float(torch.rand(1, generator=gen)) < 0.5:  # a dark stain
        r = size * (0.06 + 0.08 * float(torch.rand(1, generator=gen)))
        mask, colour = ((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2, [0.1, 0.1, 0.15]
    else:  # a bright scratch
        a = float(torch.rand(1, generator=gen)) * math.pi
        d, along = (yy - cy) * math.cos(a) - (xx - cx) * math.sin(a), (yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
        mask, colour = (d.abs() < max(1.0, size / 64)) & (along.abs() < size * 0.25), [0.95, 0.95, 0.9]
    img[:, mask] = torch.tensor(colour)[:, None]
    return img, mask


def make_synthetic_category(out, size=128, n_train=40, n_test_good=8, n_test_bad=8, seed=0, layout="mvtec"):
    """Write a small synthetic category in `layout` (LAYOUTS; VisA also writes <out>/split_csv/1cls.csv and its
    category is <out>/toy); returns the path to pass as --data."""
    if layout not in LAYOUTS:
        raise common.UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    out, gen, rows = Path(out), torch.Generator().manual_seed(seed), []
    train_dir, good_dir, bad_dir, mask_name, ext = LAYOUTS[layout]
    for i in range(n_train + n_test_good + n_test_bad):
        split, bad = "train" if i < n_train else "test", i >= n_train + n_test_good
        img, mask = synthetic_image(size, gen, bad)
        image, mask_file = f"{bad_dir if bad else train_dir if split == 'train' else good_dir}/{i:03d}{ext}", ""
        (out / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()).save(out / image)
        if bad:
            mask_file = mask_name.format(f"{i:03d}")
            (out / mask_file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(out / mask_file)
        rows.append(dict(object="toy", split=split, label="anomaly" if bad else "normal", image=image, mask=mask_file))
    if layout != "visa":
        return str(out)
    with common.atomic_open(out / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        w.writeheader()
        w.writerows(rows)
    return str(out / "toy")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/toy", help="folder to write (the --data of the stages)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--n_train", type=int, default=60, help="normal training images")
    p.add_argument("--n_test", type=int, default=20, help="test images of each kind (good, defect)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="mvtec", help="folder layout (README, your own data)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    common.check_flags(a, size=">=1", n_train=">=1", n_test=">=1", seed="seed")
    path = make_synthetic_category(a.out, a.size, a.n_train, a.n_test, a.n_test, a.seed, a.layout)
    print(f"wrote a synthetic category: --data {path}")


if __name__ == "__main__":
    common.run_main(main)
