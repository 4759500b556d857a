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

The paper's Tables 2, 4 and 5 (`--table k`, the same as `--study table<k>`): every row is scored on the test
split by evaluate.py, the paper's own numbers beside ours (notebooks/paper_results.json). Runs live in
<out>/tables/<size>px_steps<steps>_seed<seed>/<category>/<flags>, shared by the rows and tables that train
the same thing, so Table 2 then Table 4 trains only Table 4's new rows:

    python -m benchmarks.ablations --table 4 --data ../shared/data/ball_screw --steps 800
    python -m benchmarks.ablations --table 4 --data data/toy --image_size 32 --steps 2   # smoke run

Writes <out>/ablation_table<k>.md and .json.
"""
import argparse
import json
import sys
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

# the CPU recipe's stage 3 (the crd study's row 9) as {flag: value}; its leave-one-out rows change one value
# (None leaves the flag out, back to its default)
ROW9 = {"--lr": "1e-3", "--loss": "focal", "--anomaly_size": "relative", "--init_prior": "0.01",
        "--crd_input": "residual"}


def row9_with(**changed):
    """Row 9's flags with some changed: row9_with(loss="l2") -> [..., "--loss", "l2", ...]."""
    flags = {**ROW9, **{f"--{k}": v for k, v in changed.items()}}
    return [x for k, v in flags.items() if v is not None for x in (k, v)]


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
    # the CPU recipe's learning rate, then one more change per row
    "stage1_cpu": dict(stages=["stage1_rcae"], base={"stage1_rcae": ["--depth", "5", "--lr", "1e-3"]}, rows=[
        ("lr 1e-3 (N=5)", {}),
        ("lr 1e-3, input standardised", {"stage1_rcae": ["--input_norm", "1"]}),
        ("lr 1e-3, N=2", {"stage1_rcae": ["--depth", "2"]}),
        ("lr 1e-3, sigmoid output", {"stage1_rcae": ["--out_act", "sigmoid"]}),
        ("lr 1e-3, input standardised, width 64", {"stage1_rcae": ["--input_norm", "1", "--width", "64"]}),
        ("lr 1e-3, input standardised, cosine lr", {"stage1_rcae": ["--input_norm", "1", "--lr_schedule", "cosine"]}),
        ("lr 1e-3, input standardised, every depth on every batch",
         {"stage1_rcae": ["--input_norm", "1", "--depth_sampling", "all"]}),
        ("lr 1e-3, input standardised, weight average (EMA 0.99)", {"stage1_rcae": ["--input_norm", "1", "--ema", "0.99"]}),
        ("lr 1e-3, input standardised, depth drawn with p(n) ~ 1/n",
         {"stage1_rcae": ["--input_norm", "1", "--depth_sampling", "inverse"]}),
        ("lr 1e-3, input standardised, down/up started at the blocks' principal components",
         {"stage1_rcae": ["--input_norm", "1", "--updown_init", "pca"]}),
    ]),
    # what makes CRD detect (issue 11): stages 1-2 trained once per category ("upstream", the CPU recipe's
    # stage 1), then every row trains only CRD on them, one change from the paper's reading per row
    "crd": dict(stages=["stage3_crd"], upstream={"stage1_rcae": ["--lr", "1e-3", "--input_norm", "1"],
                                                 "stage2_dpn": ["--lr", "1e-3"]},
                base={"stage3_crd": ["--lr", "1e-4", "--loss", "l2", "--anomaly_size", "scaled", "--crd_input", "image"]}, rows=[
        ("paper (L2, scaled sizes, lr 1e-4)", {}),
        ("focal loss", {"stage3_crd": ["--loss", "focal"]}),
        ("relative sizes", {"stage3_crd": ["--anomaly_size", "relative"]}),
        ("lr 1e-3", {"stage3_crd": ["--lr", "1e-3"]}),
        ("residual input", {"stage3_crd": ["--crd_input", "residual"]}),
        ("BCE loss", {"stage3_crd": ["--loss", "bce"]}),
        ("pixel sizes", {"stage3_crd": ["--anomaly_size", "pixels"]}),
        ("lr 1e-3 + focal + relative sizes", {"stage3_crd": ["--lr", "1e-3", "--loss", "focal",
                                                             "--anomaly_size", "relative"]}),
        ("row 7 + head started at the prior 0.01", {"stage3_crd": ["--lr", "1e-3", "--loss", "focal",
                                                                   "--anomaly_size", "relative", "--init_prior", "0.01"]}),
        ("row 8 + residual input", {"stage3_crd": row9_with()}),
        # leave one out of row 9 (the CPU recipe's stage 3): which of its changes are needed
        ("row 9 with the L2 loss", {"stage3_crd": row9_with(loss="l2")}),
        ("row 9 with scaled sizes", {"stage3_crd": row9_with(anomaly_size="scaled")}),
        ("row 9 with lr 1e-4", {"stage3_crd": row9_with(lr="1e-4")}),
        ("row 9 with the head started at 0.5", {"stage3_crd": row9_with(init_prior=None)}),
        # pseudo anomalies closer to real defects: faint ones too (DRAEM's opacity), on row 9
        ("row 9 + DRAEM's opacity", {"stage3_crd": row9_with(opacity="draem")}),
        # the saved CRD is a moving average of its weights, not the last step's (as stage-1 row 7)
        ("row 9 + weight average (EMA 0.99)", {"stage3_crd": row9_with(ema="0.99")}),
    ]),
}

# The paper's Tables 2, 4 and 5 (--table k): a row is (the paper's label columns, stage-1 flags, the evaluate.py
# variant read, its place in notebooks/paper_results.json). Rows with the same flags share one trained run (the
# folder is named after the flags), so Table 2's last three rows are one chain, and a run another table
# trained is not trained again. ConvAE rows are scored alone by their residual, as Table 2's first row: a
# ConvAE has no recursion for DPN and CRD to use. Every RcAE row of Tables 4 and 5 is the full chain.
CONVAE = ["--arch", "convae", "--share", "0"]  # Eq. (2) in one pass (stage1_rcae docstring)
CHAIN = ["stage1_rcae", "stage2_dpn", "stage3_crd"]
# every table row starts from the CPU recipe (common.RECIPES): at a few hundred steps and the paper's lr 1e-4 no
# stage-1 depth beats the image mean (the stage-1 study), so every row would compare untrained models
RECIPE = {stage: ["--recipe", "cpu"] for stage in CHAIN}
STUDIES["table2"] = dict(stages=CHAIN, base=RECIPE, paper="table2", columns=["RcAE", "DPN", "CRD"], rows=[
    (("✗", "✗", "✗"), {"stage1_rcae": CONVAE + ["--skip", "0"]}, "rcae", ("table2", "rows", 0)),
    (("✓", "✗", "✗"), {}, "rcae", ("table2", "rows", 1)),
    (("✓", "✓", "✗"), {}, "rcae+dpn", ("table2", "rows", 2)),
    (("✓", "✓", "✓"), {}, "crd", ("table2", "rows", 3)),
])
STUDIES["table4"] = dict(stages=CHAIN, base=RECIPE, paper="table4", columns=["Model", "Skip Conn.", "Shared Weights"],
                         rows=[
    (("ConvAE", "✓", "✗"), {"stage1_rcae": CONVAE}, "rcae", ("table4", "rows", 0)),
    (("ConvAE", "✗", "✗"), {"stage1_rcae": CONVAE + ["--skip", "0"]}, "rcae", ("table4", "rows", 1)),
    (("RcAE", "✗", "✓"), {"stage1_rcae": ["--skip", "0"]}, "crd", ("table4", "rows", 2)),
    (("RcAE", "✓", "✗"), {"stage1_rcae": ["--share", "0"]}, "crd", ("table4", "rows", 3)),
    (("RcAE", "✓", "✓"), {}, "crd", ("table4", "rows", 4)),
])
STUDIES["table5"] = dict(stages=CHAIN, base=RECIPE, paper="table5", columns=["Method", "Training Data Percentage"],
                         pivot=True, rows=[
    ((method, f"{f:.0%}"), {"stage1_rcae": flags + (["--train_fraction", str(f)] if f < 1 else [])}, variant,
     ("table5", "rows", m, "results", j))
    for m, (method, flags, variant) in enumerate([("ConvAE", CONVAE + ["--skip", "0"], "rcae"), ("RcAE", [], "crd")])
    for j, f in enumerate([0.1, 0.25, 0.5, 0.75, 1.0])])
PAPER = Path(__file__).resolve().parents[1] / "notebooks" / "paper_results.json"
DATASETS = {"mvtec": "MVTec AD", "visa": "VisA"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", choices=sorted(STUDIES), help="which ablation to run")
    which.add_argument("--table", type=int,
                       help="one of the paper's tables: the same as --study table<k> (README, 'Paper tables')")
    p.add_argument("--data", nargs="+", required=True, help="one or more category folders")
    p.add_argument("--out", default="runs/ablations", help="output folder")
    p.add_argument("--image_size", type=int, default=128, help="training and test size of every row")
    p.add_argument("--steps", default="800",
                   help="optimiser steps per stage: one number, or one per stage 1,2,3 (a study of CRD alone reads "
                        "the stage-1/2 steps for its shared upstream and the last for CRD)")
    p.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    p.add_argument("--dark", type=float, default=None, help="also run on a copy of each category scaled by this")
    p.add_argument("--test", type=int, default=0, help="1: also score every row on the test split (evaluate.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of every row")
    p.add_argument("--report", type=int, default=0,
                   help="1: train nothing; tabulate the rows already trained (and evaluated) under --out")
    args = p.parse_args(argv)
    if args.table is not None and args.table not in (2, 4, 5):
        raise common.UserError(f"--table must be 2, 4 or 5 (got {args.table})")
    args.study = args.study or f"table{args.table}"
    try:
        args.steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise common.UserError(f"--steps {args.steps}: give one step count or three, e.g. 800 or 800,400,400") from None
    if len(args.steps) not in (1, 3):
        raise common.UserError(f"--steps {','.join(map(str, args.steps))}: give one step count or three (stages 1, 2, 3)")
    common.check_flags(args, steps=">=1", image_size=">=1", dark="(0,1]", test="0/1", report="0/1", seed="seed")
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


MODULES = {"stage1_rcae": stage1_rcae, "stage2_dpn": stage2_dpn, "stage3_crd": stage3_crd}
ALL = list(MODULES)


def train_stages(stages, flags, steps, data, out, args, extra=()):
    """Each stage's main() with the study's flags; a stage already trained to its steps is skipped by it."""
    common_flags = ["--data", data, "--out", out, "--seed", str(args.seed), "--epochs", "100000", "--log_every", "50",
                    "--val_every", "0", *extra]
    for stage in stages:
        argv = common_flags + flags.get(stage, []) + ["--max_steps", str(steps[stage])]
        if stage == "stage1_rcae":  # stages 2 and 3 inherit the size
            argv += ["--image_size", str(args.image_size)]
        MODULES[stage].main(argv)


def run_row(study, name, flags, data, out, args):
    """Train one row (on its study's shared upstream, if any) and read back what it logged."""
    t0 = time.time()
    extra = []
    if "upstream" in study:  # stages 1-2 once per category, shared by every row
        up = str(Path(out).parent / "upstream")
        ups = [s for s in ALL if s not in study["stages"]]
        train_stages(ups, study["upstream"], dict(zip(ALL, args.steps)), data, up, args)
        extra = ["--rcae", f"{up}/stage1_rcae.pt", "--dpn", f"{up}/stage2_dpn.pt"]
    steps = dict(zip(ALL, args.steps * len(ALL) if len(args.steps) == 1 else args.steps))  # by stage, not position
    merged = {s: study["base"].get(s, []) + flags.get(s, []) for s in study["stages"]}
    train_stages(study["stages"], merged, steps, data, out, args, extra)
    if args.test:
        evaluate.main(["--data", data, "--out", out, "--n_figures", "2"])
    return read_row(study, name, data, out, minutes=round((time.time() - t0) / 60, 2))


def read_row(study, name, data, out, **extra):
    """What a trained row logged: each stage's validation (and steps), and the test metrics if evaluated."""
    row = {"row": name, "data": data, **extra}
    for stage in study["stages"]:
        ck = torch.load(Path(out) / f"{stage}.pt", map_location="cpu", weights_only=True)
        row[stage], row[f"{stage}_steps"] = ck.get("val"), ck["step"]
    metrics = Path(out) / "metrics.json"
    if metrics.is_file():
        row["test"] = json.loads(metrics.read_text())["variants"]
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
    head = ["row", "data", "val P-AUROC", "val AUPRO", "residual val P-AUROC / AUPRO", "test I-AUROC",
            "test P-AUROC", "test AUPRO", "rcae+dpn test P-AUROC / AUPRO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for r in rows:
        val = r.get("stage3_crd") or {}
        test = (r.get("test") or {}).get("crd", {})
        dpn = (r.get("test") or {}).get("rcae+dpn", {})
        lines.append("| " + " | ".join([r["row"], Path(r["data"]).name, pct(val.get("p_auroc")), pct(val.get("aupro")),
                                        f"{pct(val.get('residual_p_auroc'))} / {pct(val.get('residual_aupro'))}",
                                        pct(test.get("i_auroc")), pct(test.get("p_auroc")), pct(test.get("aupro")),
                                        f"{pct(dpn.get('p_auroc'))} / {pct(dpn.get('aupro'))}"]) + " |")
    return lines


def write_json(args, argv, results):
    command = "python -m benchmarks.ablations " + " ".join(argv if argv is not None else sys.argv[1:])
    common.write_json(Path(args.out) / f"ablation_{args.study}.json", dict(
        study=args.study, image_size=args.image_size, steps=args.steps, command=command, rows=results))


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
    if "paper" in study:  # one of the paper's tables
        return run_table(study, rows, datas, args, argv)
    results = []
    for data in datas:
        for i, (name, flags) in rows:
            out = str(Path(args.out) / args.study / Path(data).name / f"row{i}")
            if args.report:
                if all((Path(out) / f"{s}.pt").is_file() for s in study["stages"]):
                    results.append(read_row(study, name, data, out))
                continue
            print(f"\n=== {args.study} row {i}: {name} on {data} ({out})", flush=True)
            results.append(run_row(study, name, flags, data, out, args))
            write_json(args, argv, results)  # after every row: an interrupted study keeps what it has
    write_json(args, argv, results)
    md = table(results, study)
    common.write_text(Path(args.out) / f"ablation_{args.study}.md", "\n".join(md) + "\n")
    print("\n".join(md))


def run_name(flags):
    """The folder of a trained run, named after its flags: ["--share", "0"] -> "share-0", none -> "paper"."""
    words = [w.lstrip("-") for stage in CHAIN for w in flags.get(stage, [])]
    return "_".join(f"{k}-{v}" for k, v in zip(words[::2], words[1::2])) or "paper"


def run_table(study, rows, datas, args, argv):
    """Train each run a table's rows need once (the stages of every variant read from it), evaluate it with
    evaluate.py, and write <out>/ablation_table<k>.md and .json with the paper's numbers beside ours."""
    paper = json.loads(PAPER.read_text())
    runs = {}  # run name -> (flags, stages to train), in row order
    for _, (_, flags, variant, _) in rows:
        _, stages = runs.setdefault(run_name(flags), (flags, []))
        stages += [s for s in evaluate.variant_stages(variant) if s not in stages]
    root = Path(args.out) / "tables" / f"{args.image_size}px_steps{'-'.join(map(str, args.steps))}_seed{args.seed}"
    test_args = argparse.Namespace(**{**vars(args), "test": 1})
    trained = {}  # (category, run) -> run_row's result

    def save():  # the table so far: written after every run, so an interrupted table keeps what it has
        result = table_result(study, rows, trained, datas, paper, args, argv)
        common.write_json(Path(args.out) / f"ablation_{args.study}.json", result)
        return result

    for data in datas:
        for name, (flags, stages) in runs.items():
            out, stages = root / Path(data).name / name, sorted(stages, key=CHAIN.index)
            if args.report:  # only what is trained and evaluated already
                if all((out / f"{s}.pt").is_file() for s in stages) and (out / "metrics.json").is_file():
                    trained[Path(data).name, name] = read_row(dict(study, stages=stages), name, data, out)
                continue
            print(f"\n=== {args.study} run {name} on {data} ({out}): {', '.join(stages)}")
            trained[Path(data).name, name] = run_row(dict(study, stages=stages), name, flags, data, str(out), test_args)
            save()
    result = save()
    md = table_markdown(study, result)
    common.write_text(Path(args.out) / f"ablation_{args.study}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


METRICS = ("i_auroc", "p_auroc", "aupro")


def table_result(study, rows, trained, datas, paper, args, argv):
    """The table as JSON: per row its labels, run, variant, the paper's numbers and ours per category and mean."""
    cats = [Path(d).name for d in datas]
    out = []
    for i, (labels, flags, variant, where) in rows:
        name = run_name(flags)
        ours = {c: {k: trained[c, name]["test"][variant].get(k) for k in METRICS} for c in cats if (c, name) in trained}
        mean = {}
        for k in METRICS:
            vals = [o[k] for o in ours.values() if o[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
        out.append(dict(index=i, labels=list(labels), run=name, variant=variant, flags=flags,
                        paper=_get(paper, where), ours=ours, ours_mean=mean if ours else None))
    return dict(study=args.study, caption=paper[study["paper"]]["caption"], columns=study["columns"],
                image_size=args.image_size, steps=args.steps, seed=args.seed, base_flags=study["base"], categories=cats,
                runs_folder=str(Path(args.out) / "tables"),
                command="python -m benchmarks.ablations " + " ".join(argv or __import__("sys").argv[1:]), rows=out)


def _pair(v, scale=100):
    """"I-AUROC/P-AUROC" in percent: ours are fractions (scale 100), the paper's percent (scale 1)."""
    if not v or v.get("i_auroc") is None:
        return "-"
    p = "-" if v.get("p_auroc") is None else f"{scale * v['p_auroc']:.1f}"
    return f"{scale * v['i_auroc']:.1f}/{p}"


def table_markdown(study, result):
    """The paper's layout, I-AUROC/P-AUROC (%): its label columns, ours per category (and their mean), the
    paper's per dataset. Table 5 (pivot) first gets the paper's grid, each cell "ours mean (paper)"."""
    rows, cats = result["rows"], result["categories"]
    datasets = [d for d in DATASETS if rows and d in rows[0]["paper"]] or ["mvtec"]  # Table 4 has both

    def paper_cell(r, d):
        return _pair(r["paper"].get(d, r["paper"]), scale=1)

    base = " ".join(dict.fromkeys(" ".join(f) for f in result.get("base_flags", {}).values()))
    lines = [f"{result['caption']}. Ours: {result['image_size']} px, {result['steps']} steps per stage, seed "
             f"{result['seed']}" + (f", every stage with `{base}`" if base else "") + f": `{result['command']}`", ""]
    if study.get("pivot"):
        cols = list(dict.fromkeys(r["labels"][-1] for r in rows))
        lines += ["| " + " | ".join(study["columns"][:1] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for method in dict.fromkeys(r["labels"][0] for r in rows):
            cell = {r["labels"][-1]: f"{_pair(r['ours_mean'])} ({paper_cell(r, 'mvtec')})"
                    for r in rows if r["labels"][0] == method}
            lines.append("| " + " | ".join([method] + [cell.get(c, "-") for c in cols]) + " |")
        lines.append("")
    head = study["columns"] + ["variant"] + [f"ours {c}" for c in cats] + (["ours mean"] if len(cats) > 1 else []) \
        + [f"paper {DATASETS[d]}" for d in datasets]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ours = [_pair(r["ours"].get(c)) for c in cats] + ([_pair(r["ours_mean"])] if len(cats) > 1 else [])
        lines.append("| " + " | ".join(r["labels"] + [r["variant"]] + ours + [paper_cell(r, d) for d in datasets]) + " |")
    return lines


if __name__ == "__main__":
    common.run_main(main)
