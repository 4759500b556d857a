"""Depth residuals: how well does each recursion depth's plain residual |I - I_R^n| find the real defects?

evaluate.py scores stage 1 by its deepest residual only (variant "rcae", |I - I_R^N|). This scores every depth
n = 1..N of a stage-1 checkpoint the same way (channel mean, Gaussian sigma, P-AUROC over the test split's
pixels), and gives the mean raw residual inside the defect masks and outside them. It answers whether a
change to stage 1 exposes the real defects better or worse before stages 2-3 see its reconstructions. With
--dpn (one stage-2 checkpoint per --rcae) every depth is scored a second time after DPN, |I - I_D^n| (depth
N's is evaluate.py's "rcae+dpn"): what DPN puts back, inside the defects and elsewhere. It reads the test
split's labels, like evaluate.py: a measurement, never a choice made during training.

    python -m benchmarks.depth_residuals --data ../shared/data/ball_screw \
        --rcae runs/ablations/tables/128px_steps1758-263-258_seed0/ball_screw/paper/stage1_rcae.pt \
        --dpn runs/ablations/tables/128px_steps1758-263-258_seed0/ball_screw/paper/stage2_dpn.pt

Prints a table; --out writes it as JSON.
"""
import argparse
from pathlib import Path

import torch

import common
import evaluate
import stage1_rcae
import stage2_dpn


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--data", required=True, help="a category with a test split and ground-truth masks")
    p.add_argument("--rcae", nargs="+", required=True, help="trained stage-1 checkpoints (stage1_rcae.pt)")
    p.add_argument("--dpn", nargs="+", default=None,
                   help="a stage-2 checkpoint of each --rcae, in the same order: every depth is scored after DPN too")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of every map (evaluate.py's)")
    p.add_argument("--batch_size", type=int, default=16, help="test images per forward pass")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    common.check_flags(args, sigma=">=0", batch_size=">=1")
    if args.dpn is not None and len(args.dpn) != len(args.rcae):
        raise common.UserError(f"--dpn: give one stage-2 checkpoint per --rcae ({len(args.rcae)}), got {len(args.dpn)}")
    return args


@torch.no_grad()
def depth_rows(model, split, sigma, batch_size, dpn=None):
    """Per depth n: P-AUROC of the smoothed |I - I_R^n| over the images with pixel ground truth, and the mean
    raw residual (channel mean, before smoothing) inside and outside the defect masks; with a DPN the same of
    |I - I_D^n| under keys ending in "_dpn"."""
    keep = split.has_mask.nonzero().flatten()
    gt = split.masks[keep, 0]  # (M, H, W) bool
    maps = {"": ([], []), "_dpn": ([], [])} if dpn is not None else {"": ([], [])}  # suffix -> (raws, smooths)
    for i in range(0, len(keep), batch_size):  # only the (B, N, H, W) maps are kept, never the reconstructions
        x = common.to_float(split.images[keep[i:i + batch_size]])  # (B, C, H, W)
        recons = model.reconstruct_all(x).float()  # (B, N, C, H, W)
        for suffix, (raws, smooths) in maps.items():
            r = recons if not suffix else dpn.refine(recons, x)  # I_R^n, or I_D^n of Eq. (6)
            raws.append((x[:, None] - r).abs().mean(2))  # (B, N, H, W)
            smooths.append(torch.stack([evaluate.residual_map(x, r[:, k], sigma)[:, 0]  # evaluate.py's map
                                        for k in range(r.shape[1])], 1))  # (B, N, H, W)
    rows = [{"depth": n} for n in range(1, model.cfg.depth + 1)]
    for suffix, (raws, smooths) in maps.items():
        raws, smooths = torch.cat(raws), torch.cat(smooths)  # (M, N, H, W)
        for n, row in enumerate(rows):
            raw, smooth = raws[:, n], smooths[:, n]  # (M, H, W)
            row.update({f"p_auroc{suffix}": evaluate.pixel_auroc(gt.numpy(), smooth.numpy()),
                        f"residual_defect{suffix}": float(raw[gt].mean()) if gt.any() else None,
                        f"residual_normal{suffix}": float(raw[~gt].mean())})
    return rows


def main(argv=None):
    args = get_args(argv)
    out = []
    for i, path in enumerate(args.rcae):
        model, ck = stage1_rcae.load_rcae(path)
        dpn = None
        if args.dpn is not None:
            dpn, dpn_ck = stage2_dpn.load_dpn(args.dpn[i])
            common.check_chain({"rcae": ck, "dpn": dpn_ck}, {"rcae": path, "dpn": args.dpn[i]}, args.data)
        a = ck["args"]
        split = common.load_split(args.data, "test", a["image_size"], 2, a.get("resize", "squash"))
        rows = depth_rows(model, split, args.sigma, args.batch_size, dpn)
        out.append({"rcae": str(path), "dpn": None if dpn is None else str(args.dpn[i]), "data": str(args.data),
                    "sigma": args.sigma, "rows": rows})
        print(path)
        for r in rows:
            for suffix, name in (("", "I - I_R"), ("_dpn", "I - I_D")):
                if f"p_auroc{suffix}" in r:
                    d = r[f"residual_defect{suffix}"]
                    res = "-" if d is None else f"{d:.4f}"
                    print(f"  depth {r['depth']} |{name}^n|: P-AUROC {100 * r[f'p_auroc{suffix}']:5.1f}   residual "
                          f"in defects {res}, elsewhere {r[f'residual_normal{suffix}']:.4f}")
    if args.out:
        common.write_json(args.out, out)
        print(f"-> {args.out}")


if __name__ == "__main__":
    common.run_main(main)
