"""RcAE vs FAIR side by side: the same category, image size and training budget.

The budget is compute on this machine, not wall time that a busy machine stretches: first the training
step of every RcAE stage and of FAIR is timed round-robin (A, B, C, D, A, ...; speed drifts, so the
methods are measured together), then each gets the number of steps that fits its minutes
(`steps = minutes * 60 / seconds per step`; RcAE's minutes are split over its stages by --split).
FAIR's learning-rate drops at 80% and 90% therefore fall where its paper puts them. Every stage is a
plain `main()` call with --max_steps, so no training code is duplicated here. evaluate.py then scores
both on the test split, and inference is timed round-robin on one batch. Peak memory is the peak RSS of
a bare process running one inference batch of each method above its loaded baseline.

    python -m benchmarks.compare --data ../shared/data/magnetic_tile --budget_min 20
    python -m benchmarks.compare --data ../shared/data/magnetic_tile --steps 1758,263,258,83 --recipe cpu
    python -m benchmarks.compare --data ../shared/data/magnetic_tile --steps 1758,263,258,83 --image_size 128 \
        --stage1 '--lr 1e-3' --stage2 '--lr 1e-3' --stage3 '--lr 1e-3 --loss focal --anomaly_size relative'
    python -m benchmarks.compare --data data/toy --budget_min 1 --image_size 64   # smoke run

Timing on a busy machine shrinks the budget (two torch processes on 2 cores slow each other far more than
2x): a warning says so when the load average exceeds the cores, and --steps (four counts, or a previous
compare.json) gives the same budget on any machine. The steps used are in the table's header.

Writes <out>/compare.json and <out>/compare.md (out: runs/compare/<category>), plus everything
evaluate.py writes for both methods (metrics.json, figures/).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import evaluate
import stage1_rcae
import stage2_dpn
import stage3_crd
from baselines import fair
from benchmarks import speed

STAGES = [("stage1_rcae", stage1_rcae), ("stage2_dpn", stage2_dpn), ("stage3_crd", stage3_crd)]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="one category folder (MVTec AD or VisA layout)")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare/<category>)")
    p.add_argument("--budget_min", "--budget-min", dest="budget_min", type=float, default=20,
                   help="training minutes per method, on this machine's measured speed")
    p.add_argument("--steps", default=None,
                   help="explicit optimiser steps instead of timing: 'stage1,stage2,stage3,fair' (e.g. "
                        "1758,263,258,83) or a previous compare.json, whose steps are reused; the same budget on any "
                        "machine")
    p.add_argument("--recipe", choices=sorted(common.RECIPES), default="paper",
                   help="the RcAE stages' --recipe (common.RECIPES; --stageK flags override it); FAIR keeps its own")
    p.add_argument("--image_size", type=int, default=None,
                   help="the same for both methods (default: the recipe's, 128 for cpu, else 256)")
    p.add_argument("--depth", type=int, default=5, help="RcAE recursion depth N (paper: 5)")
    p.add_argument("--split", default="0.4,0.2,0.4", help="RcAE budget fractions of stages 1, 2, 3")
    for k in (1, 2, 3):
        p.add_argument(f"--stage{k}", type=shlex.split, default=[], metavar="FLAGS",
                       help=f"extra flags of stage {k}, quoted, e.g. --stage{k} '--lr 1e-3'")
    p.add_argument("--batch_size", type=int, default=8, help="training batch of both methods")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both (default: each paper's, 1e-4)")
    p.add_argument("--fair_base", type=int, default=128, help="FAIR UNet base width (paper: 128)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of both methods")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = common.RECIPES[args.recipe].get("stage1_rcae", {}).get("image_size", 256)
    common.check_flags(args, budget_min=">0", image_size=">=1", depth=">=1", batch_size=">=1", lr=">0",
                       fair_base=">=1", seed="seed")
    return args


def shared_flags(args, out):
    """The flags of every RcAE stage and of FAIR (stages 2-3 inherit the image size from stage 1)."""
    flags = ["--data", args.data, "--out", out, "--batch_size", str(args.batch_size), "--device", args.device,
             "--seed", str(args.seed), "--epochs", "100000"]
    return flags + (["--lr", str(args.lr)] if args.lr else [])


def step_seconds(args, device):
    """Seconds per training step of stages 1-3 and FAIR at this size and batch, timed round-robin."""
    sargs = speed.get_args(["--batch_size", str(args.batch_size), "--depth", str(args.depth), "--device",
                            args.device, "--repeats", "3"])
    m = speed.models(args.depth, device, sargs)
    m["fair"] = fair.FAIR(fair.Config(base=args.fair_base)).to(device)
    sargs.fair_batch, sargs.fair_sizes = args.batch_size, [args.image_size]
    its = speed.items(m, args.image_size, sargs, device)
    names = {"stage1_rcae": "train stage1 RcAE", "stage2_dpn": "train stage2 DPN",
             "stage3_crd": "train stage3 CRD", "fair": "train FAIR"}
    return speed.round_robin({k: its[v][0] for k, v in names.items()}, sargs.repeats, device)


NAMES = ["stage1_rcae", "stage2_dpn", "stage3_crd", "fair"]


def explicit_steps(text):
    """--steps 'a,b,c,d' or a compare.json path -> {stage1_rcae: a, stage2_dpn: b, stage3_crd: c, fair: d}."""
    if Path(text).is_file():
        try:
            steps = json.loads(Path(text).read_text())["budget_steps"]
        except (ValueError, KeyError, TypeError):
            raise common.UserError(f"--steps {text}: not a compare.json with budget_steps") from None
        return {k: int(steps[k]) for k in NAMES}
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or min(vals) < 1:
        raise common.UserError(f"--steps {text}: give four positive step counts 'stage1,stage2,stage3,fair' "
                               f"(e.g. 1758,263,258,83) or a compare.json")
    return dict(zip(NAMES, vals))


def load_warning():
    """A warning when the machine was busy while the steps were timed: the budget in steps then shrinks."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        common.warn(f"load average {load:.1f} exceeds the {cores} cores while timing: other processes share the CPU "
                    f"and the step budget comes out too small; rerun on a quiet machine or pass --steps")
    return round(load, 2)


def train_both(args, out, device):
    split = [float(s) for s in args.split.split(",")]
    if len(split) != 3 or abs(sum(split) - 1) > 1e-6:
        raise common.UserError(f"--split needs three fractions summing to 1 (got {args.split})")
    if args.steps:
        steps, sec, load = explicit_steps(args.steps), {}, None
    else:
        sec = step_seconds(args, device)
        load = load_warning()
        minutes = {"stage1_rcae": split[0] * args.budget_min, "stage2_dpn": split[1] * args.budget_min,
                   "stage3_crd": split[2] * args.budget_min, "fair": args.budget_min}
        steps = {k: max(1, round(minutes[k] * 60 / sec[k])) for k in sec}
        print("seconds per step: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items()))
    print("steps in the budget: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    wall, recipe = {}, ["--recipe", args.recipe]  # the recipe before --stageK's flags, which override it
    size = ["--image_size", str(args.image_size)]
    for name, module in STAGES + [("fair", fair)]:
        extra = {"stage1_rcae": size + recipe + ["--depth", str(args.depth)] + args.stage1,
                 "stage2_dpn": recipe + args.stage2, "stage3_crd": recipe + args.stage3,
                 "fair": size + ["--base", str(args.fair_base)]}[name]
        t0 = time.time()
        module.main(shared_flags(args, out) + extra + ["--max_steps", str(steps[name])])
        wall[name] = round((time.time() - t0) / 60, 2)
    return dict(seconds_per_step={k: round(v, 3) for k, v in sec.items()}, budget_steps=steps, wall_minutes=wall,
                load_average_while_timing=load)


PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.speed import hwm_mb, rss_mb
kind, out, size, batch = {kind!r}, {out!r}, {size}, {batch}
if kind == "rcae":
    import stage3_crd
    det = stage3_crd.load_detector(out)
    run = lambda x: det.predict(x)
else:
    from baselines import fair
    model, ck = fair.load_fair(out + "/fair.pt")
    run = lambda x: fair.fair_maps(model, ck, x)
with torch.inference_mode():
    run(torch.rand(1, 3, size, size))  # loads the kernels' libraries, which would dominate the peak (at the
    # trained size: CRD's --residual_scale position map fits no other)
    x = torch.rand(batch, 3, size, size)
    base = rss_mb()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    run(x)
print(round(hwm_mb(), 1), round(hwm_mb() - base, 1))
"""


def peak_rss_mb(kind, out, size, batch):
    """(peak RSS, its increase over the loaded model) in MiB of a bare process running one batch."""
    code = PROBE.format(root=str(Path(__file__).resolve().parents[1]), kind=kind, out=str(out), size=size, batch=batch)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        common.warn(f"memory probe of {kind} failed: {res.stderr.strip().splitlines()[-1:]}")
        return None, None
    peak, delta = res.stdout.split()
    return float(peak), float(delta)


def interleaved_speed(out, size, device, batch=4, rounds=3):
    """Inference images/s of the full RcAE pipeline and of FAIR on the same batch, timed alternately."""
    det = stage3_crd.load_detector(out).to(device)
    model, ck = fair.load_fair(Path(out) / "fair.pt")
    model.to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    fns = {"rcae": lambda: det.predict(x), "fair": lambda: fair.fair_maps(model, ck, x)}
    with torch.inference_mode():
        times = speed.round_robin(fns, rounds, device)
    return {k: round(batch / t, 3) for k, t in times.items()}


def main(argv=None):
    args = get_args(argv)
    out = args.out or str(Path("runs") / "compare" / Path(args.data).resolve().name)
    device = common.get_device(args.device)
    common.check_size(args.image_size, args.depth)
    budget = train_both(args, out, device)
    evaluate.main(["--data", args.data, "--out", out, "--device", args.device, "--n_figures", "3"])
    evaluate.main(["--data", args.data, "--out", out, "--device", args.device, "--method", "fair", "--n_figures", "3"])
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    infer = interleaved_speed(out, args.image_size, device)
    mem = {kind: peak_rss_mb(kind, out, args.image_size, 4) for kind in ("rcae", "fair")}
    rate = {k: round(args.batch_size / v, 3) for k, v in budget["seconds_per_step"].items()}
    rate = {k: rate[k] if k in rate else round(budget["budget_steps"][k] * args.batch_size /
                                                 max(60 * budget["wall_minutes"][k], 1e-3), 3)
            for k in NAMES}  # explicit steps: the training's own rate, its overheads included
    train_rate = {"rcae": {name: rate[name] for name, _ in STAGES}, "fair": rate["fair"]}
    steps = {name: torch.load(Path(out) / f"{name}.pt", weights_only=True, map_location="cpu")["step"]
             for name in [s for s, _ in STAGES] + ["fair"]}
    rows = []
    for method, variant in (("RcAE (full: RcAE+DPN+CRD)", "crd"), ("RcAE+DPN (residual)", "rcae+dpn"),
                            ("RcAE (residual)", "rcae"), (f"FAIR (base {args.fair_base})", "fair")):
        v = metrics["variants"][variant]
        kind = "fair" if variant == "fair" else "rcae"
        rows.append(dict(method=method, variant=variant, i_auroc=v["i_auroc"], p_auroc=v["p_auroc"], aupro=v["aupro"],
                         params=v["params"], train_images_per_s=train_rate[kind],
                         infer_images_per_s=infer[kind] if variant in ("crd", "fair") else round(v["images_per_s"], 3),
                         peak_rss_mb=mem[kind] if variant in ("crd", "fair") else (None, None)))
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu x{torch.get_num_threads()} threads")
    report = dict(data=args.data, recipe=args.recipe, image_size=args.image_size, budget_min=args.budget_min,
                  split=args.split, **budget, steps=steps, device=device_name,
                  n_images=metrics["n_images"], n_anomalous=metrics["n_anomalous"], rows=rows,
                  command="python -m benchmarks.compare " + " ".join(argv or sys.argv[1:]))
    common.write_json(Path(out) / "compare.json", report)
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    mem_cell = lambda m: "" if m[0] is None else f"{m[0]:.0f} ({m[1]:.0f})"  # noqa: E731
    budget_text = "explicit steps" if args.steps else f"{args.budget_min:g} min per method, split {args.split}"
    md = [f"{Path(args.data).name}, {args.image_size}x{args.image_size}, {metrics['n_images']} test images "
          f"({metrics['n_anomalous']} anomalous); training budget: {budget_text}, on {device_name} "
          f"(RcAE --recipe {args.recipe}); steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()), "",
          "| method | I-AUROC | P-AUROC | AUPRO | params | train img/s | infer img/s | peak RSS MiB (inference part) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = r["train_images_per_s"]
        tr = "/".join(str(v) for v in tr.values()) if isinstance(tr, dict) else tr
        md.append(f"| {r['method']} | {pct(r['i_auroc'])} | {pct(r['p_auroc'])} | {pct(r['aupro'])} | {r['params']:,} "
                  f"| {tr} | {r['infer_images_per_s']} | {mem_cell(r['peak_rss_mb'])} |")
    md.append("\ntrain img/s of RcAE: stage 1/2/3. Inference of the full pipeline and of FAIR timed round-robin "
              "on one batch; the residual variants' speed comes from evaluate.py. Peak RSS: a bare process loading the "
              "method and running one batch of 4; in brackets its increase over the loaded model.")
    common.write_text(Path(out) / "compare.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    common.run_main(main)
