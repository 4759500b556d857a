"""Depth probe: how much better could one recursion depth reconstruct, and what would the others pay?

RcAE shares one E and one D over every depth (paper, Eq. (3)-(4)), trained on a depth drawn per batch. This
fine-tunes a copy of a trained stage-1 checkpoint on one depth n only, with stage 1's own batches (pseudo
anomalies on --anomaly_prob of the images, the clean image as target, Eq. (5)), and reports every depth's
reconstruction measure on the holdout normal images (stage1_rcae.recon_report) every --every steps. If depth
n improves while the other depths get worse, depth n is held back by the sharing, not by what the network
can represent at that depth. Nothing is written but the report; the checkpoint is left as it is.

    python -m benchmarks.depth_probe --rcae runs/ablations/tables/128px_steps1758-263-258_seed0/ball_screw/paper/stage1_rcae.pt

Writes <out> (default: depth_probe_d<n>.json beside the checkpoint) and prints a table.
"""
import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import common
import stage1_rcae
from common import UserError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--rcae", required=True, help="a trained stage-1 checkpoint (stage1_rcae.pt)")
    p.add_argument("--depth", type=int, default=1, help="the one depth n to fine-tune on")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--every", type=int, default=100, help="report every this many steps (and at 0)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=123, help="seed of the probe's batches (not one training used)")
    p.add_argument("--out", default=None, help="report JSON (default: depth_probe_d<n>.json beside --rcae)")
    args = p.parse_args(argv)
    common.check_flags(args, steps=">=1", every=">=1", lr=">0", seed="seed")
    return args


def main(argv=None):
    args = get_args(argv)
    model, ck = stage1_rcae.load_rcae(args.rcae)
    if not 1 <= args.depth <= model.cfg.depth:
        raise UserError(f"--depth must be in 1..{model.cfg.depth}, the checkpoint's N (got {args.depth})")
    if model.cfg.arch != "rcae":
        raise UserError(f"{args.rcae} is a ConvAE (one depth only): there is nothing to trade between depths")
    train = SimpleNamespace(**ck["args"])  # the checkpoint's data, size, holdout and pseudo-anomaly flags
    images, holdout = common.train_images(train), common.train_images(train, part="holdout")
    if not len(holdout):
        raise UserError(f"{args.rcae} was trained without a holdout (--holdout 0): nothing to measure on")
    for q in model.parameters():
        q.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr or train.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    rows, t0 = [], time.time()

    def report(step):
        model.eval()
        rep = stage1_rcae.recon_report(model, holdout, batch_size=train.batch_size)
        rows.append({"step": step, **{k: round(v, 6) for k, v in rep.items()}})
        cells = " ".join(f"{rep[f'ratio_mean_{n}']:.3f}" for n in range(1, model.cfg.depth + 1))
        print(f"step {step:5d} ({time.time() - t0:4.0f}s)  L1/mean d1..d{model.cfg.depth}: {cells}  "
              f"L1/blur d{args.depth}: {rep[f'ratio_blur_{args.depth}']:.3f}", flush=True)

    report(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (train.batch_size,), generator=gen)
        b = stage1_rcae.make_batch(common.to_float(images[idx]), gen, train.anomaly_prob, args.depth,
                                   train.anomaly_size, random_depth=False,  # always depth n, none drawn
                                   opacity=getattr(train, "opacity", "strong"))
        model.train()
        loss, _ = stage1_rcae.loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            report(step)
    out = Path(args.out or Path(args.rcae).with_name(f"depth_probe_d{args.depth}.json"))
    out.write_text(json.dumps({"rcae": str(args.rcae), "depth": args.depth, "steps": args.steps,
                               "lr": args.lr or train.lr, "seed": args.seed, "rows": rows}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    common.run_main(main)
