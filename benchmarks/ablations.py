"""The paper's ablation Tables 2, 4, 5 and 6 at a fixed step budget, the paper's numbers beside ours.

A table is a list of rows; a row names the stage flags it changes from the CPU recipe and the evaluate.py
variant it reads. Every row trains the stages it needs through the stages' own main() (no training code
here) and is scored on the test split by evaluate.py (for the table, never for training). The paper's numbers
come from notebooks/paper_results.json.

    python -m benchmarks.ablations --table 2 --data ../shared/data/magnetic_tile ../shared/data/ball_screw \
        --steps 1758,263,258
    python -m benchmarks.ablations --table 4 --data data/toy --image_size 32 --steps 2   # smoke run

Runs live in <out>/tables/<size>px_steps<steps>_seed<seed>/<category>/<flags>, named after their flags and
shared by the rows and tables that train the same thing: Table 2's last three rows are one chain, Table 2 then
Table 4 trains only Table 4's new rows, and Table 6's rows (CRD reading fewer depths) train only a CRD on the
stages 1-2 of Table 2's chain. A run already trained is not trained again (the stages resume or skip), so an
interrupted table resumes; --report 1 tabulates what is there and trains nothing.

Writes <out>/ablation_table<k>.md and .json (out: runs/ablations).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common
import evaluate
import stage1_rcae
import stage2_dpn
import stage3_crd

MODULES = {"stage1_rcae": stage1_rcae, "stage2_dpn": stage2_dpn, "stage3_crd": stage3_crd}
CHAIN = list(MODULES)

# A row is (the paper's label columns, flags per stage, the evaluate.py variant read, its place in
# notebooks/paper_results.json). ConvAE rows are scored alone by their residual, as Table 2's first row: a
# ConvAE has no recursion for DPN and CRD to use. Every RcAE row of Tables 4, 5 and 6 is the full chain.
CONVAE = ["--arch", "convae", "--share", "0"]  # Eq. (2) in one pass (stage1_rcae docstring)
# every row starts from the CPU recipe (common.RECIPES): at a few hundred steps and the paper's lr 1e-4 no stage-1
# depth beats the image mean (docs/results.md), so every row would compare untrained models
RECIPE = {stage: ["--recipe", "cpu"] for stage in CHAIN}
TABLES = {
    2: dict(columns=["RcAE", "DPN", "CRD"], rows=[
        (("✗", "✗", "✗"), {"stage1_rcae": CONVAE + ["--skip", "0"]}, "rcae", ("table2", "rows", 0)),
        (("✓", "✗", "✗"), {}, "rcae", ("table2", "rows", 1)),
        (("✓", "✓", "✗"), {}, "rcae+dpn", ("table2", "rows", 2)),
        (("✓", "✓", "✓"), {}, "crd", ("table2", "rows", 3)),
    ]),
    4: dict(columns=["Model", "Skip Conn.", "Shared Weights"], rows=[
        (("ConvAE", "✓", "✗"), {"stage1_rcae": CONVAE}, "rcae", ("table4", "rows", 0)),
        (("ConvAE", "✗", "✗"), {"stage1_rcae": CONVAE + ["--skip", "0"]}, "rcae", ("table4", "rows", 1)),
        (("RcAE", "✗", "✓"), {"stage1_rcae": ["--skip", "0"]}, "crd", ("table4", "rows", 2)),
        (("RcAE", "✓", "✗"), {"stage1_rcae": ["--share", "0"]}, "crd", ("table4", "rows", 3)),
        (("RcAE", "✓", "✓"), {}, "crd", ("table4", "rows", 4)),
    ]),
    5: dict(columns=["Method", "Training Data Percentage"], pivot=True, rows=[
        ((method, f"{f:.0%}"), {"stage1_rcae": flags + (["--train_fraction", str(f)] if f < 1 else [])}, variant,
         ("table5", "rows", m, "results", j))
        for m, (method, flags, variant) in enumerate([("ConvAE", CONVAE + ["--skip", "0"], "rcae"),
                                                      ("RcAE", [], "crd")])
        for j, f in enumerate([0.1, 0.25, 0.5, 0.75, 1.0])]),
    # N_R: the depths CRD reads (stage 3's --use_depths); all N = 5 is Table 2's full chain
    6: dict(columns=["N_R", "depths"], rows=[
        (("1", "5"), {"stage3_crd": ["--use_depths", "5"]}, "crd", ("table6", "rows", 0)),
        (("3", "1,3,5"), {"stage3_crd": ["--use_depths", "1,3,5"]}, "crd", ("table6", "rows", 1)),
        (("5", "1,2,3,4,5"), {}, "crd", ("table6", "rows", 2)),
    ]),
}
PAPER = Path(__file__).resolve().parents[1] / "notebooks" / "paper_results.json"
DATASETS = {"mvtec": "MVTec AD", "visa": "VisA"}
METRICS = ("i_auroc", "p_auroc", "aupro")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", type=int, required=True, help="the paper's table: 2, 4, 5 or 6")
    p.add_argument("--data", nargs="+", required=True, help="one or more category folders")
    p.add_argument("--out", default="runs/ablations", help="output folder")
    p.add_argument("--image_size", type=int, default=128, help="training and test size of every row")
    p.add_argument("--steps", default="800", help="optimiser steps per stage: one number, or one per stage 1,2,3")
    p.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every row")
    p.add_argument("--report", type=int, default=0,
                   help="1: train nothing; tabulate the rows already trained and evaluated under --out")
    args = p.parse_args(argv)
    if args.table not in TABLES:
        raise common.UserError(f"--table must be 2, 4, 5 or 6 (got {args.table})")
    try:
        args.steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise common.UserError(f"--steps {args.steps}: give one step count or three, e.g. 800 or 800,400,400") from None
    if len(args.steps) not in (1, 3):
        raise common.UserError(f"--steps {','.join(map(str, args.steps))}: give one step count or three "
                               f"(stages 1, 2, 3)")
    common.check_flags(args, steps=">=1", image_size=">=1", report="0/1", seed="seed")
    return args


def run_name(flags):
    """The folder of a trained run, named after its flags: ["--share", "0"] -> "share-0", none -> "paper"."""
    words = [w.lstrip("-") for stage in CHAIN for w in flags.get(stage, [])]
    return "_".join(f"{k}-{v}" for k, v in zip(words[::2], words[1::2])) or "paper"


def upstream_name(flags):
    """A run that changes CRD's flags trains only a CRD, on the stages 1-2 of the run without those flags
    (Table 6); None for every other run."""
    return run_name({s: f for s, f in flags.items() if s != "stage3_crd"}) if flags.get("stage3_crd") else None


def train_stages(stages, flags, data, out, args, extra=()):
    """Each stage's main() with the recipe and the row's flags; a stage already trained to its steps is skipped by
    it (stage 3 only recalibrates its threshold)."""
    steps = dict(zip(CHAIN, args.steps * 3 if len(args.steps) == 1 else args.steps))
    for stage in stages:
        argv = ["--data", data, "--out", str(out), "--seed", str(args.seed), "--epochs", "100000", *extra,
                *RECIPE[stage], *flags.get(stage, []), "--max_steps", str(steps[stage])]
        if stage == "stage1_rcae":  # stages 2 and 3 inherit the size
            argv += ["--image_size", str(args.image_size)]
        MODULES[stage].main(argv)


def read_run(stages, data, out):
    """What a trained run logged: each stage's validation and steps, and evaluate.py's test metrics."""
    run = {"data": data, "out": str(out)}
    for stage in stages:
        ck = torch.load(Path(out) / f"{stage}.pt", map_location="cpu", weights_only=True)
        run[stage], run[f"{stage}_steps"] = ck.get("val"), ck["step"]
    run["test"] = json.loads((Path(out) / "metrics.json").read_text())["variants"]
    return run


def main(argv=None):
    args = get_args(argv)
    table = TABLES[args.table]
    rows = list(enumerate(table["rows"]))
    if args.rows:
        keep = {int(i) for i in args.rows.split(",")}
        rows = [r for r in rows if r[0] in keep]
    runs = {}  # run name -> (flags, stages to train), in row order
    for _, (_, flags, variant, _) in rows:
        _, stages = runs.setdefault(run_name(flags), (flags, []))
        stages += [s for s in evaluate.variant_stages(variant) if s not in stages]
    root = Path(args.out) / "tables" / f"{args.image_size}px_steps{'-'.join(map(str, args.steps))}_seed{args.seed}"
    trained = {}  # (category, run) -> read_run's result

    def save():  # the table so far: written after every run, so an interrupted table keeps what it has
        result = table_result(table, rows, trained, args, argv)
        common.write_json(Path(args.out) / f"ablation_table{args.table}.json", result)
        return result

    for data in args.data:
        cat = Path(data).name
        for name, (flags, stages) in runs.items():
            out, stages, extra = root / cat / name, sorted(stages, key=CHAIN.index), []
            up = upstream_name(flags)
            if up:  # CRD alone, on the shared stages 1-2 of the run without its flags
                upstream, stages = root / cat / up, ["stage3_crd"]
                extra = ["--rcae", str(upstream / "stage1_rcae.pt"), "--dpn", str(upstream / "stage2_dpn.pt")]
            if args.report:  # only what is trained and evaluated already
                if all((out / f"{s}.pt").is_file() for s in stages) and (out / "metrics.json").is_file():
                    trained[cat, name] = read_run(stages, data, out)
                continue
            print(f"\n=== table {args.table} run {name} on {data} ({out}): {', '.join(stages)}", flush=True)
            if up:
                train_stages(["stage1_rcae", "stage2_dpn"], flags, data, upstream, args)
            train_stages(stages, flags, data, out, args, extra)
            evaluate.main(["--data", data, "--out", str(out), "--n_figures", "2"])
            trained[cat, name] = read_run(stages, data, out)
            save()
    result = save()
    md = table_markdown(table, result)
    common.write_text(Path(args.out) / f"ablation_table{args.table}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def table_result(table, rows, trained, args, argv):
    """The table as JSON: per row its labels, run, variant, the paper's numbers and ours per category and mean."""
    paper = json.loads(PAPER.read_text())
    cats = [Path(d).name for d in args.data]
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
    return dict(table=args.table, caption=paper[f"table{args.table}"]["caption"], columns=table["columns"],
                image_size=args.image_size, steps=args.steps, seed=args.seed, base_flags=RECIPE, categories=cats,
                runs_folder=str(Path(args.out) / "tables"),
                command="python -m benchmarks.ablations " + " ".join(argv if argv is not None else sys.argv[1:]),
                rows=out)


def _pair(v, scale=100):
    """"I-AUROC/P-AUROC" in percent: ours are fractions (scale 100), the paper's percent (scale 1)."""
    if not v or v.get("i_auroc") is None:
        return "-"
    p = "-" if v.get("p_auroc") is None else f"{scale * v['p_auroc']:.1f}"
    return f"{scale * v['i_auroc']:.1f}/{p}"


def table_markdown(table, result):
    """The paper's layout, I-AUROC/P-AUROC (%): its label columns, ours per category (and their mean), the
    paper's per dataset. Table 5 (pivot) first gets the paper's grid, each cell "ours mean (paper)"."""
    rows, cats = result["rows"], result["categories"]
    datasets = [d for d in DATASETS if rows and d in rows[0]["paper"]] or ["mvtec"]  # Table 4 has both

    def paper_cell(r, d):
        return _pair(r["paper"].get(d, r["paper"]), scale=1)

    base = " ".join(dict.fromkeys(" ".join(f) for f in result["base_flags"].values()))
    lines = [f"{result['caption']}. Ours: {result['image_size']} px, {result['steps']} steps per stage, seed "
             f"{result['seed']}, every stage with `{base}`: `{result['command']}`", ""]
    if table.get("pivot"):
        cols = list(dict.fromkeys(r["labels"][-1] for r in rows))
        lines += ["| " + " | ".join(table["columns"][:1] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for method in dict.fromkeys(r["labels"][0] for r in rows):
            cell = {r["labels"][-1]: f"{_pair(r['ours_mean'])} ({paper_cell(r, 'mvtec')})"
                    for r in rows if r["labels"][0] == method}
            lines.append("| " + " | ".join([method] + [cell.get(c, "-") for c in cols]) + " |")
        lines.append("")
    head = table["columns"] + ["variant"] + [f"ours {c}" for c in cats] + (["ours mean"] if len(cats) > 1 else []) \
        + [f"paper {DATASETS[d]}" for d in datasets]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ours = [_pair(r["ours"].get(c)) for c in cats] + ([_pair(r["ours_mean"])] if len(cats) > 1 else [])
        cells = r["labels"] + [r["variant"]] + ours + [paper_cell(r, d) for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    common.run_main(main)
