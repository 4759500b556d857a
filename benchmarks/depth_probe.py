"""Depth probe: how much better could one recursion depth reconstruct, and what would the others pay?

RcAE shares one E and one D over every depth (paper, Eq. (3)-(4)), trained on a depth drawn per batch. This
fine-tunes a copy of a trained stage-1 checkpoint on one depth n only, with stage 1's own batches (pseudo
anomalies on --anomaly_prob of the images, the clean image as target, Eq. (5)), and reports every depth's
reconstruction measure on the holdout normal images (stage1_rcae.recon_report) every --every steps. If depth
n improves while the other depths get worse, depth n is held back by the sharing, not by what the network
can represent at that depth. Nothing is written but the report; the checkpoint is left as it is.

Before fine-tuning it asks what depth n's code I_C^n holds (`code_fit`): an affine decoder is fitted by least
squares from the trained code (each code pixel alone, and with its 3x3 neighbours) to the 2^n x 2^n image
block above it, on the training images, and scored on the holdout; beside it, the best any code of the same
shape (C numbers per block) could do with an affine decoder, the top-C principal components of the blocks.
A code whose affine decoders stay far from that bound keeps little more than the blur does: what depth n
shows beyond them is D's learned (nonlinear) upsampling. Last, `up_span`: every depth's reconstruction ends in
level 1's 2x2 stride-2 deconvolution from C channels, so each 2x2 block of any I_R^n is an affine function of
C numbers, in the one span that layer learned; the holdout projected onto that span is the best any D could
give with it.

    python -m benchmarks.depth_probe --rcae runs/ablations/tables/128px_steps1758-263-258_seed0/ball_screw/paper/stage1_rcae.pt

Writes <out> (default: depth_probe_d<n>.json beside the checkpoint) and prints a table.
"""
import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common
import stage1_rcae
from common import UserError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    p.add_argument("--rcae", required=True, help="a trained stage-1 checkpoint (stage1_rcae.pt)")
    p.add_argument("--depth", type=int, default=1, help="the one depth n to fine-tune on")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (0: only the code fit and the report)")
    p.add_argument("--every", type=int, default=100, help="report every this many steps (and at 0)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=123, help="seed of the probe's batches (not one training used)")
    p.add_argument("--out", default=None, help="report JSON (default: depth_probe_d<n>.json beside --rcae)")
    args = p.parse_args(argv)
    common.check_flags(args, steps=">=0", every=">=1", lr=">0", seed="seed")
    return args


def to_blocks(x, s):
    """(M, C, H, W) -> (M * H/s * W/s, C * s * s): every s x s block as a row (channel, row, column)."""
    return F.unfold(x, s, stride=s).transpose(1, 2).reshape(-1, x.shape[1] * s * s)


def from_blocks(b, like, s):
    """The inverse of to_blocks, shaped like `like` (M, C, H, W)."""
    return F.fold(b.reshape(len(like), -1, b.shape[1]).transpose(1, 2), like.shape[-2:], s, stride=s)


def blur_ratio(pred_blocks, ho, s, n):
    """L1 of the image made of pred_blocks (clamped to [0, 1]) to the holdout ho, over that of ho's 2^n blur."""
    err = (from_blocks(pred_blocks, ho, s).clamp(0, 1) - ho).abs().mean()
    return float(err / (stage1_rcae.blur(ho, n) - ho).abs().mean())


@torch.no_grad()
def code_fit(model, images, holdout, n, max_images=300):
    """What depth n's code holds. uint8 images (M, C, H, W) -> {name: L1 on the holdout / L1 of the 2^n blur}:
    affine decoders fitted (least squares, on <= max_images training images) from the code I_C^n (1x1: a
    code pixel; 3x3: with its neighbours) to the 2^n x 2^n block above it, and "pca_bound": the blocks'
    mean plus their top-C principal components, the best affine code of C numbers per block."""
    s, c = 2 ** n, model.cfg.channels

    def codes(x):
        return torch.cat([model.compress(x[i:i + 32], n)[-1] for i in range(0, len(x), 32)]).float()

    tr, ho = common.to_float(images[:max_images]), common.to_float(holdout)

    def score(pred_blocks):
        return blur_ratio(pred_blocks, ho, s, n)

    out, ctr, cho, btr = {}, codes(tr), codes(ho), to_blocks(tr, s)
    for k in (1, 3):
        def feats(code):  # (M, C, h, w) -> (M * h * w, C * k * k + 1), a code pixel with its k x k neighbours
            f = F.unfold(code, k, padding=k // 2).transpose(1, 2).reshape(-1, c * k * k)
            return torch.cat([f, torch.ones(len(f), 1)], 1).double()
        w = torch.linalg.lstsq(feats(ctr), btr.double()).solution
        out[f"linear_{k}x{k}"] = score((feats(cho) @ w).float())
    mean, v = stage1_rcae.block_pca(tr, s, c)  # (C s s,), (C, C s s): the top-C components
    out["pca_bound"] = score((to_blocks(ho, s) - mean) @ v.T @ v + mean)
    return out


@torch.no_grad()
def up_span(model, holdout, n):
    """uint8 holdout (M, C, H, W) -> L1 / L1 of the 2^n blur of the holdout's least-squares projection onto
    what the last layer can output: D "ends with a deconvolutional upsampling layer (kernel size = 2,
    stride = 2)" (paper, "Recursive Structure") from the C channels of X_1, so every 2x2 output block is
    off + v @ basis, v in R^C, at every depth. None with a sigmoid output (not an affine span)."""
    if model.cfg.out_act != "none":
        return None
    c, up = model.cfg.channels, model.level(model.up, 1)
    probe = torch.cat([torch.zeros(1, c, 1, 1), torch.eye(c).view(c, c, 1, 1)])  # v = 0, then each unit vector
    o = model.output(up(probe)).flatten(1).double()  # (1 + C, C * 4): the output block for each v
    off, basis = o[0], o[1:] - o[0]
    ho = common.to_float(holdout)
    v = torch.linalg.lstsq(basis.T, (to_blocks(ho, 2).double() - off).T).solution  # (C, M H W / 4)
    return blur_ratio((v.T @ basis + off).float(), ho, 2, n)


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
    opt = common.adam(model.parameters(), args.lr or train.lr)
    gen = torch.Generator().manual_seed(args.seed)
    rows, t0 = [], time.time()

    def report(step):
        model.eval()
        rep = stage1_rcae.recon_report(model, holdout, batch_size=train.batch_size)
        rows.append({"step": step, **{k: round(v, 6) for k, v in rep.items()}})
        cells = " ".join(f"{rep[f'ratio_mean_{n}']:.3f}" for n in range(1, model.cfg.depth + 1))
        print(f"step {step:5d} ({time.time() - t0:4.0f}s)  L1/mean d1..d{model.cfg.depth}: {cells}  "
              f"L1/blur d{args.depth}: {rep[f'ratio_blur_{args.depth}']:.3f}", flush=True)

    fit = {**code_fit(model, images, holdout, args.depth), "up_span": up_span(model, holdout, args.depth)}
    print(f"depth {args.depth}'s code, L1 / blur on the holdout, affine decoders: "
          + ", ".join(f"{k} {v:.2f}" for k, v in fit.items() if v is not None) + f" (the trained D: step 0's L1/blur d{args.depth})")
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
    common.write_json(out, {"rcae": str(args.rcae), "depth": args.depth, "steps": args.steps,
                            "lr": args.lr or train.lr, "seed": args.seed, "code_fit": fit, "rows": rows})
    print(f"-> {out}")


if __name__ == "__main__":
    common.run_main(main)
