"""Revalidate: score trained chains on label-free validation sets drawn with other pseudo-anomaly settings.

Stage 3 validates on the holdout normal images (kept out of every stage's training) with pseudo anomalies
from a stream no training stage draws, drawn with the run's own --anomaly_size, --opacity and --anomaly_place. Does the
validation rank chains the way the real defects of the test split do? This scores each chain's CRD map, and
the residual |I - I_D^N| beside it, on that holdout under each --opacity, --anomaly_size, --anomaly_place and
--anomaly_kind given (the same stream; colours always the run's own --anomaly_colour), and puts the test
metrics evaluate.py wrote into <out>/metrics.json beside them.
The validation reads no test label; the test columns are only copied, so a validation setting can be checked
against them: with several run folders of one category, each setting's Spearman rank correlation between the
chains' validation and test scores (P-AUROC with P-AUROC, AUPRO with AUPRO) says how well it would have chosen.

    python -m benchmarks.revalidate --out runs/base/ball_screw runs/nodpn/ball_screw --opacity strong draem \
        --anomaly_size relative scaled

Prints a table and the rank correlations; --json writes both.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from scipy import stats

import common
import stage3_crd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--out", nargs="+", required=True, help="run folders, each with a trained chain (stage3_crd.pt)")
    p.add_argument("--opacity", nargs="+", choices=common.OPACITIES, default=list(common.OPACITIES),
                   help="validation sets to draw: how strongly the pseudo anomalies are blended in")
    p.add_argument("--anomaly_size", nargs="+", choices=common.ANOMALY_SIZES, default=None,
                   help="validation sets to draw: pseudo-anomaly sizes (default: each run's own --anomaly_size)")
    p.add_argument("--anomaly_place", nargs="+", choices=common.PLACES, default=None,
                   help="validation sets to draw: where the blocks go (default: each run's own --anomaly_place)")
    p.add_argument("--anomaly_kind", nargs="+", choices=["all", *common.ANOMALY_KINDS, common.WARP],
                   default=["all"], help="validation sets to draw: every kind of pseudo anomaly (all: stage 3's "
                                         "validation) or one; warp is drawn by no training stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draws (stage 3 always validates on seed 0, whatever its --seed)")
    p.add_argument("--batch_size", type=int, default=8, help="holdout images per forward pass")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    common.check_flags(args, batch_size=">=1")
    return args


def run_rows(out, opacities, seed, batch_size, sizes=None, kinds=("all",), places=None):
    """One row per (opacity, size, place, kind) for the chain in `out`: validation P-AUROC / AUPRO of CRD and of
    the residual. sizes, places None: the run's own --anomaly_size, --anomaly_place."""
    chain = stage3_crd.load_chain(out)
    crd, ck = stage3_crd.crd_of(chain, out)
    rcae, dpn = chain["stage1_rcae"][0], chain["stage2_dpn"][0]
    # data, image size, holdout, resize and pseudo anomalies of stage 3 (a checkpoint older than a flag: what it did)
    a = argparse.Namespace(**{**common.BEFORE_FLAG, **ck["args"]})
    holdout = common.train_images(a, part="holdout")  # (M, C, H, W) uint8, never trained on
    if not len(holdout):
        raise common.UserError(f"{out}: stage 3 ran with --holdout 0, so there is nothing to validate on")
    metrics = Path(out) / "metrics.json"
    test = json.loads(metrics.read_text())["variants"] if metrics.is_file() else {}
    rows = []
    for opacity, size, place, kind in itertools.product(opacities, sizes or [a.anomaly_size],
                                                        places or [a.anomaly_place], kinds):
        drawn = common.ANOMALY_KINDS if kind == "all" else (kind,)
        how = argparse.Namespace(anomaly_size=size, opacity=opacity, anomaly_place=place,
                                 anomaly_colour=a.anomaly_colour)
        val = stage3_crd.validation_set(holdout, how, seed, drawn)
        r = stage3_crd.validate(crd, rcae, dpn, val, batch_size=batch_size, amp=a.amp)
        rows.append({"out": str(out), "data": str(a.data), "opacity": opacity, "anomaly_size": size,
                     "anomaly_place": place, "anomaly_kind": kind, "anomaly_colour": a.anomaly_colour,
                     "trained_opacity": a.opacity,
                     "trained_anomaly_size": a.anomaly_size, "trained_anomaly_place": a.anomaly_place, "val": r,
                     "test": {k: {m: v.get(m) for m in ("i_auroc", "p_auroc", "aupro")} for k, v in test.items()}})
    return rows


def agreement(rows):
    """Per category and validation setting (opacity, size, place, kind), over the runs with test metrics: Spearman's
    rank correlation of CRD's validation P-AUROC / AUPRO with its test P-AUROC / AUPRO. 1: it orders the chains
    as the test split does; -1: the reverse. None with fewer than 3 runs."""
    out = []
    for (data, opacity, size, place, kind, colour), group in itertools.groupby(sorted(rows, key=setting), key=setting):
        group = [r for r in group if r["test"].get("crd", {}).get("aupro") is not None]
        res = {"data": data, "opacity": opacity, "anomaly_size": size, "anomaly_place": place, "anomaly_kind": kind,
               "anomaly_colour": colour, "runs": len(group)}
        for m in ("p_auroc", "aupro"):
            val, test = [r["val"][m] for r in group], [r["test"]["crd"][m] for r in group]
            res[f"spearman_{m}"] = float(stats.spearmanr(val, test)[0]) if len(group) >= 3 else None
        out.append(res)
    return out


def setting(row):
    return (row["data"], row["opacity"], row["anomaly_size"], row["anomaly_place"], row["anomaly_kind"],
            row["anomaly_colour"])


def pct(v):
    return "  -  " if v is None else f"{100 * v:5.1f}"


def main(argv=None):
    args = get_args(argv)
    rows, t0 = [], time.time()
    for i, out in enumerate(args.out, 1):
        rows += run_rows(out, args.opacity, args.seed, args.batch_size, args.anomaly_size, args.anomaly_kind,
                         args.anomaly_place)
        per_run = (time.time() - t0) / i
        print(f"revalidate: {i}/{len(args.out)} runs ({out}), {per_run:.0f} s a run, "
              f"ETA {per_run * (len(args.out) - i):.0f} s", file=sys.stderr, flush=True)
    print("run | opacity | size | place | kind | val CRD P-AUROC / AUPRO | val residual P-AUROC / AUPRO | "
          "test crd P-AUROC / AUPRO")
    for r in rows:
        v, t = r["val"], r["test"].get("crd", {})
        print(f"{r['out']} | {r['opacity']} | {r['anomaly_size']} | {r['anomaly_place']} | {r['anomaly_kind']} | "
              f"{pct(v['p_auroc'])} / {pct(v['aupro'])} | {pct(v['residual_p_auroc'])} / {pct(v['residual_aupro'])} | "
              f"{pct(t.get('p_auroc'))} / {pct(t.get('aupro'))}")
    agree = agreement(rows)
    print("validation setting | runs | Spearman val/test P-AUROC | AUPRO (1: ranks the chains as the test split does)")
    for a in agree:
        rho = ["  -  " if a[k] is None else f"{a[k]:+.2f}" for k in ("spearman_p_auroc", "spearman_aupro")]
        print(f"{Path(a['data']).name}: {a['opacity']}, {a['anomaly_size']}, {a['anomaly_place']}, "
              f"{a['anomaly_kind']} | {a['runs']} | {rho[0]} | {rho[1]}")
    if args.json:
        common.write_json(args.json, {"rows": rows, "agreement": agree})
        print(f"revalidate: wrote {args.json}")


if __name__ == "__main__":
    common.run_main(main)
