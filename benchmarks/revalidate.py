"""Revalidate: score trained chains on label-free validation sets drawn with other pseudo-anomaly settings.

Stage 3 validates on the holdout normal images (kept out of every stage's training) with pseudo anomalies
from a stream no training stage draws, blended with the run's own --opacity. Does the validation rank two
chains the way the real defects of the test split do? This scores each chain's CRD map, and the residual
|I - I_D^N| beside it, on that holdout under each --opacity given (the same draws apart from the blending),
and puts the test metrics evaluate.py wrote into <out>/metrics.json beside them. The validation reads no test
label; the test columns are only copied, so a validation setting can be checked against them.

    python -m benchmarks.revalidate --out runs/base/ball_screw runs/nodpn/ball_screw --opacity strong draem

Prints a table; --json writes it.
"""
import argparse
import json
from pathlib import Path

import common
import stage3_crd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--out", nargs="+", required=True, help="run folders, each with a trained chain (stage3_crd.pt)")
    p.add_argument("--opacity", nargs="+", choices=common.OPACITIES, default=list(common.OPACITIES),
                   help="validation sets to draw: how strongly the pseudo anomalies are blended in")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draws (stage 3 always validates on seed 0, whatever its --seed)")
    p.add_argument("--batch_size", type=int, default=8, help="holdout images per forward pass")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    common.check_flags(args, batch_size=">=1")
    return args


def run_rows(out, opacities, seed, batch_size):
    """One row per opacity for the chain in `out`: validation P-AUROC / AUPRO of CRD and of the residual."""
    chain = stage3_crd.load_chain(out)
    crd, ck = stage3_crd.crd_of(chain, out)
    rcae, dpn = chain["stage1_rcae"][0], chain["stage2_dpn"][0]
    # data, image size, holdout, resize and pseudo anomalies of stage 3 (a checkpoint older than a flag: its default)
    a = argparse.Namespace(**{"anomaly_size": "scaled", "opacity": "strong", "amp": 1, **ck["args"]})
    holdout = common.train_images(a, part="holdout")  # (M, C, H, W) uint8, never trained on
    if not len(holdout):
        raise common.UserError(f"{out}: stage 3 ran with --holdout 0, so there is nothing to validate on")
    metrics = Path(out) / "metrics.json"
    test = json.loads(metrics.read_text())["variants"] if metrics.is_file() else {}
    rows = []
    for opacity in opacities:
        val = stage3_crd.validation_set(holdout, argparse.Namespace(anomaly_size=a.anomaly_size, opacity=opacity), seed)
        r = stage3_crd.validate(crd, rcae, dpn, val, batch_size=batch_size, amp=a.amp)
        rows.append({"out": str(out), "opacity": opacity, "trained_opacity": a.opacity, "anomaly_size": a.anomaly_size,
                     "val": r, "test": {k: {m: v.get(m) for m in ("i_auroc", "p_auroc", "aupro")} for k, v in test.items()}})
    return rows


def pct(v):
    return "  -  " if v is None else f"{100 * v:5.1f}"


def main(argv=None):
    args = get_args(argv)
    rows = [r for out in args.out for r in run_rows(out, args.opacity, args.seed, args.batch_size)]
    print("run | opacity | val CRD P-AUROC / AUPRO | val residual P-AUROC / AUPRO | test crd P-AUROC / AUPRO")
    for r in rows:
        v, t = r["val"], r["test"].get("crd", {})
        print(f"{r['out']} | {r['opacity']} | {pct(v['p_auroc'])} / {pct(v['aupro'])} | "
              f"{pct(v['residual_p_auroc'])} / {pct(v['residual_aupro'])} | {pct(t.get('p_auroc'))} / {pct(t.get('aupro'))}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"revalidate: wrote {args.json}")


if __name__ == "__main__":
    common.run_main(main)
