"""Border: are the defects at the image border found as well as those inside it?

Real defects often touch the border (magnetic_tile's breaks are broken tile edges); pseudo anomalies placed
wholly inside the image rarely do (common.PLACES), so a detector trained on them can learn that the border is
never anomalous. This measures both sides on one category:
  - where the anomalous pixels lie: the share within --band px of the border, in the test split's masks and in
    pseudo anomalies drawn on the holdout normal images under each --anomaly_place (a quarter of the image's
    area lies within 8 px of the border at 128 px);
  - how busy the normal images are at the border: the holdout normal images' mean gradient |I'| within the band
    over its mean inside;
  - for each run folder (evaluate.py's variants and maps, Gaussian --sigma): the AUROC of the anomalous pixels
    within the band against all normal pixels, and of those inside against all normal pixels; and the mean map
    of the normal test images within the band over its mean inside (below 1: the border is scored as more
    normal than the rest).
It reads the test split's labels, like evaluate.py: a measurement, never a choice made during training.

    python -m benchmarks.border --data ../shared/data/magnetic_tile --out runs/base/magnetic_tile

Prints a table; --json writes the rows.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import common
import evaluate
import stage3_crd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--data", required=True, help="a category with a test split and ground-truth masks")
    p.add_argument("--out", nargs="*", default=[], help="run folders with trained stages (evaluate.py's --out)")
    p.add_argument("--band", type=int, default=8, help="width in px of the border band, at the model's size")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of every map (evaluate.py's)")
    p.add_argument("--image_size", type=int, default=128, help="size of the masks without --out (else the runs')")
    p.add_argument("--anomaly_size", choices=common.ANOMALY_SIZES, default="relative",
                   help="sizes of the pseudo anomalies whose placement is measured")
    p.add_argument("--batch_size", type=int, default=16, help="test images per forward pass")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    common.check_flags(args, band=">=1", sigma=">=0", image_size=">=1", batch_size=">=1")
    return args


def band_of(size, width):
    """(size, size) bool: the pixels within `width` px of the border."""
    band = np.ones((size, size), bool)
    band[width:-width, width:-width] = False
    return band


def border_share(masks, band):
    """The share of the anomalous pixels of masks (M, H, W) that lie in band (H, W); None without any."""
    total = int(masks.sum())
    return float(masks[:, band].sum()) / total if total else None


def border_scores(masks, maps, normal, band):
    """AUROC of the anomalous pixels in band and inside it, each against every normal pixel, and the normal images'
    mean map in band over their mean inside. masks, maps (M, H, W); normal (M,) bool: the normal images."""
    neg = maps[~masks]
    out = {}
    for where, inside in (("border", band), ("inside", ~band)):
        pos = maps[:, inside][masks[:, inside]]
        both = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        out[f"p_auroc_{where}"] = evaluate.pixel_auroc(both, np.r_[pos, neg]) if len(pos) else None
    nm = maps[normal]
    out["normal_border_over_inside"] = float(nm[:, band].mean() / nm[:, ~band].mean())
    return out


def main(argv=None):
    args = get_args(argv)
    chains = {out: evaluate.load_stages(Path(out), args.data, "rcae") for out in args.out}
    # the holdout normal images and the model's size and resize of the first run's stage 1 (without --out: defaults)
    a = {"image_size": args.image_size, "holdout": common.SHARED_DEFAULTS["holdout"]}
    if chains:
        a = next(iter(chains.values()))["stage1_rcae"][1]["args"]
    a = argparse.Namespace(**{**common.BEFORE_FLAG, **a, "data": args.data, "workers": 2})
    size, resize = a.image_size, a.resize
    for out, st in chains.items():  # one test split, at one size, for every run's maps
        if evaluate.image_size_of(st) != size:
            raise common.UserError(f"--out {out} was trained at {evaluate.image_size_of(st)} px, {args.out[0]} at "
                                   f"{size} px: give runs of one size")
    split = common.load_split(args.data, "test", size, 2, resize)
    keep = split.has_mask.numpy()
    images = split.images[torch.from_numpy(keep)]  # (M, C, H, W): the images with pixel ground truth
    masks = split.masks[keep, 0].numpy() > 0  # (M, H, W)
    normal = split.labels.numpy()[keep] == 0
    band = band_of(size, args.band)
    res = {"data": str(args.data), "band": args.band, "image_size": size, "area_share": float(band.mean()),
           "test_share": border_share(masks, band), "pseudo_share": {}, "runs": []}
    holdout = common.train_images(a, part="holdout")
    g = common.grad(common.to_float(holdout)).abs().mean(1)  # (M, 2C, H, W) -> (M, H, W)
    t = torch.from_numpy(band)
    res["normal_grad_border_over_inside"] = float(g[:, t].mean() / g[:, ~t].mean())
    for place in common.PLACES:
        how = argparse.Namespace(anomaly_size=args.anomaly_size, opacity="strong", anomaly_place=place,
                                 anomaly_colour="uniform")
        _, pm = stage3_crd.validation_set(holdout, how)
        res["pseudo_share"][place] = border_share(pm[:, 0].numpy() > 0, band)
    print(f"{args.data}: share of the anomalous pixels within {args.band} px of the border ({100 * band.mean():.0f}% "
          f"of the area): test masks {100 * res['test_share']:.1f}%, pseudo anomalies ({args.anomaly_size}) "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res["pseudo_share"].items())
          + f"; holdout normal images' |I'| border / inside {res['normal_grad_border_over_inside']:.2f}")
    print("run | variant | P-AUROC border / inside (each against all normal pixels) | normal map border / inside")
    device = torch.device("cpu")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for out, st in chains.items():
        for name, fn in evaluate.variant_fns(st, args.sigma, evaluate.topk_frac_of(st, None)).items():
            maps = evaluate.run_variant(fn, images, device, args.batch_size, name)[0]
            r = {"out": str(out), "variant": name, **border_scores(masks, maps, normal, band)}
            res["runs"].append(r)
            print(f"{out} | {name} | {pct(r['p_auroc_border'])} / {pct(r['p_auroc_inside'])} | "
                  f"{r['normal_border_over_inside']:.2f}", flush=True)
    if args.json:
        common.write_json(args.json, res)
        print(f"border: wrote {args.json}")


if __name__ == "__main__":
    common.run_main(main)
