"""Depth residuals: how well does each recursion depth's plain residual |I - I_R^n| find the real defects?

evaluate.py scores stage 1 by its deepest residual only (variant "rcae", |I - I_R^N|). This scores every depth
n = 1..N of a stage-1 checkpoint the same way (channel mean, Gaussian sigma, P-AUROC over the test split's
pixels), and gives the mean raw residual inside the defect masks and outside them. It answers whether a
change to stage 1 exposes the real defects better or worse before stages 2-3 see its reconstructions. It
reads the test split's labels, like evaluate.py: a measurement, never a choice made during training.

    python -m benchmarks.depth_residuals --data ../shared/data/ball_screw \
        --rcae runs/ablations/tables/128px_steps1758-263-258_seed0/ball_screw/paper/stage1_rcae.pt

Prints a table; --out writes it as JSON.
"""
import argparse
import json
from pathlib import Path

import torch

import common
import evaluate
import stage1_rcae


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--data", required=True, help="a category with a test split and ground-truth masks")
    p.add_argument("--rcae", nargs="+", required=True, help="trained stage-1 checkpoints (stage1_rcae.pt)")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of every map (evaluate.py's)")
    p.add_argument("--batch_size", type=int, default=16, help="test images per forward pass")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    common.check_flags(args, sigma=">=0", batch_size=">=1")
    return args


@torch.no_grad()
def depth_rows(model, split, sigma, batch_size):
    """Per depth n: P-AUROC of the smoothed |I - I_R^n| over the images with pixel ground truth, and the mean
    raw residual (channel mean, before smoothing) inside and outside the defect masks."""
    keep = split.has_mask.nonzero().flatten()
    gt, raws, smooths = split.masks[keep, 0], [], []  # (M, H, W) bool
    for i in range(0, len(keep), batch_size):  # only the (B, N, H, W) maps are kept, never the reconstructions
        x = common.to_float(split.images[keep[i:i + batch_size]])  # (B, C, H, W)
        recons = model.reconstruct_all(x).float()  # (B, N, C, H, W)
        raws.append((x[:, None] - recons).abs().mean(2))  # (B, N, H, W)
        smooths.append(torch.stack([evaluate.residual_map(x, recons[:, k], sigma)[:, 0]  # evaluate.py's rcae map
                                    for k in range(recons.shape[1])], 1))  # (B, N, H, W)
    raws, smooths = torch.cat(raws), torch.cat(smooths)  # (M, N, H, W)
    rows = []
    for n in range(1, raws.shape[1] + 1):
        raw, smooth = raws[:, n - 1], smooths[:, n - 1]  # (M, H, W)
        rows.append({"depth": n, "p_auroc": evaluate.pixel_auroc(gt.numpy(), smooth.numpy()),
                     "residual_defect": float(raw[gt].mean()) if gt.any() else None,
                     "residual_normal": float(raw[~gt].mean())})
    return rows


def main(argv=None):
    args = get_args(argv)
    out = []
    for path in args.rcae:
        model, ck = stage1_rcae.load_rcae(path)
        a = ck["args"]
        split = common.load_split(args.data, "test", a["image_size"], 2, a.get("resize", "squash"))
        rows = depth_rows(model, split, args.sigma, args.batch_size)
        out.append({"rcae": str(path), "data": str(args.data), "sigma": args.sigma, "rows": rows})
        print(path)
        for r in rows:
            res = "-" if r["residual_defect"] is None else f"{r['residual_defect']:.4f}"
            print(f"  depth {r['depth']}: P-AUROC {100 * r['p_auroc']:5.1f}   residual in defects {res}, "
                  f"elsewhere {r['residual_normal']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"-> {args.out}")


if __name__ == "__main__":
    common.run_main(main)
