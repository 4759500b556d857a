"""Ablations at a fixed step budget: one change per row, the same steps for every row, every category.

A study is a list of rows; a row names the flags it changes from the study's base. Every row trains the
stages it needs through the stages' own main() (no training code here), and is read back from what the
stages log on data kept out of training (stage 1: the reconstruction report on the holdout normal images;
stage 3: P-AUROC / AUPRO on holdout images with pseudo anomalies of a stream training never draws). With
--test 1, evaluate.py then scores each row on the test split (for the table, never for training).
A row already trained is not trained again (the stages resume or skip), so an interrupted study resumes.

    python -m benchmarks.ablations --study stage1 --data ../shared/data/magnetic_tile ../shared/data/ball_screw
    python -m benchmarks.ablations --study stage1 --data data/toy --image_size 64 --steps 20   # smoke run

--dark 0.25 adds, for every category, a copy with intensities scaled by 0.25 (dark, low contrast).
Writes <out>/ablation_<study>.md and .json (out: runs/ablations).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
import evaluate
import stage1_rcae
import stage2_dpn
import stage3_crd

# each study: the base flags of every stage, then rows (name, {stage: extra flags}); "stages" = which to train
STUDIES = {
    # what makes the recursion learn at a CPU budget (issue 11): every row changes one thing from "paper"
    "stage1": dict(stages=["stage1_rcae"], base={"stage1_rcae": ["--depth", "5", "--lr", "1e-4"]}, rows=[
        ("paper (N=5, lr 1e-4)", {}),
        ("N=2 (32x32 deepest code)", {"stage1_rcae": ["--depth", "2"]}),
        ("lr 1e-3", {"stage1_rcae": ["--lr", "1e-3"]}),
        ("InstanceNorm", {"stage1_rcae": ["--norm", "instance"]}),
        ("input standardised", {"stage1_rcae": ["--input_norm", "1"]}),
        ("sigmoid output", {"stage1_rcae": ["--out_act", "sigmoid"]}),
        ("width 64", {"stage1_rcae": ["--width", "64"]}),
    ]),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), required=True, help="which ablation to run")
    p.add_argument("--data", nargs="+", required=True, help="one or more category folders")
    p.add_argument("--out", default="runs/ablations", help="output folder")
    p.add_argument("--image_size", type=int, default=128, help="training and test size of every row")
    p.add_argument("--steps", default="800", help="optimiser steps per stage: one number, or one per stage (a,b,c)")
    p.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    p.add_argument("--dark", type=float, default=None, help="also run on a copy of each category scaled by this")
    p.add_argument("--test", type=int, default=0, help="1: also score every row on the test split (evaluate.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of every row")
    args = p.parse_args(argv)
    try:
        args.steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise common.UserError(f"--steps {args.steps}: give one step count or three, e.g. 800 or 800,400,400") from None
    common.check_flags(args, steps=">=1", image_size=">=1", dark="(0,1]", test="0/1", seed="seed")
    return args


def dark_copy(data, factor, root):
    """A copy of a category with every image's intensities scaled by `factor` (masks unchanged)."""
    src, dst = Path(data), Path(root) / f"{Path(data).name}_x{factor:g}"
    if (dst / ".done").is_file():
        return str(dst)
    for f in sorted(src.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in common.IMAGE_EXTS:
            continue
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in f.parts:
            out.write_bytes(f.read_bytes())
            continue
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) * factor
        Image.fromarray((a + 0.5).astype(np.uint8)).save(out.with_suffix(".png"))
    (dst / ".done").write_text("")
    return str(dst)


def run_row(study, name, flags, data, out, args):
    common_flags = ["--data", data, "--out", out, "--seed", str(args.seed), "--epochs", "100000", "--log_every", "50",
                    "--val_every", "0"]
    steps = dict(zip(study["stages"], args.steps * len(study["stages"]) if len(args.steps) == 1 else args.steps))
    modules = {"stage1_rcae": stage1_rcae, "stage2_dpn": stage2_dpn, "stage3_crd": stage3_crd}
    t0 = time.time()
    for stage in study["stages"]:
        argv = common_flags + study["base"].get(stage, []) + flags.get(stage, []) + ["--max_steps", str(steps[stage])]
        if stage == "stage1_rcae":  # stages 2 and 3 inherit the size
            argv += ["--image_size", str(args.image_size)]
        modules[stage].main(argv)
    row = {"row": name, "data": data, "steps": steps, "minutes": round((time.time() - t0) / 60, 2)}
    for stage in study["stages"]:
        ck = torch.load(Path(out) / f"{stage}.pt", map_location="cpu", weights_only=True)
        row[stage] = ck.get("val")
    if args.test:
        evaluate.main(["--data", data, "--out", out, "--n_figures", "2"])
        row["test"] = json.loads((Path(out) / "metrics.json").read_text())["variants"]
    return row


def table(rows, study):
    """Markdown: one line per (row, category)."""
    if study["stages"] == ["stage1_rcae"]:
        depth = max(int(k.split("_")[-1]) for r in rows for k in (r["stage1_rcae"] or {}) if k.startswith("l1_blur_"))
        head = ["row", "data"] + [f"L1/mean d{n}" for n in range(1, depth + 1)] + [
            f"L1/blur d{n}" for n in range(1, depth + 1)] + ["PSNR d1"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            v = r["stage1_rcae"] or {}
            cell = lambda k: f"{v[k]:.2f}" if k in v else "-"  # noqa: E731
            lines.append("| " + " | ".join([r["row"], Path(r["data"]).name] + [cell(f"ratio_mean_{n}") for n in range(
                1, depth + 1)] + [cell(f"ratio_blur_{n}") for n in range(1, depth + 1)] + [cell("psnr_1")]) + " |")
        return lines
    head = ["row", "data", "val P-AUROC", "val AUPRO", "test I-AUROC", "test P-AUROC", "test AUPRO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for r in rows:
        val = r.get("stage3_crd") or {}
        test = (r.get("test") or {}).get("crd", {})
        lines.append("| " + " | ".join([r["row"], Path(r["data"]).name, pct(val.get("p_auroc")), pct(val.get("aupro")),
                                        pct(test.get("i_auroc")), pct(test.get("p_auroc")), pct(test.get("aupro"))]) + " |")
    return lines


def main(argv=None):
    args = get_args(argv)
    study = STUDIES[args.study]
    rows = list(enumerate(study["rows"]))
    if args.rows:
        keep = {int(i) for i in args.rows.split(",")}
        rows = [r for r in rows if r[0] in keep]
    datas = list(args.data)
    if args.dark:
        datas += [dark_copy(d, args.dark, Path(args.out) / "data") for d in args.data]
    results = []
    for data in datas:
        for i, (name, flags) in rows:
            out = str(Path(args.out) / args.study / Path(data).name / f"row{i}")
            print(f"\n=== {args.study} row {i}: {name} on {data} ({out})")
            results.append(run_row(study, name, flags, data, out, args))
            res_path = Path(args.out) / f"ablation_{args.study}.json"
            res_path.write_text(json.dumps(dict(study=args.study, image_size=args.image_size, steps=args.steps,
                                                command="python -m benchmarks.ablations " + " ".join(
                                                    argv or __import__("sys").argv[1:]), rows=results), indent=1))
    md = table(results, study)
    (Path(args.out) / f"ablation_{args.study}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    common.run_main(main)
