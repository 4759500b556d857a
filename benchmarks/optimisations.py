"""Before/after images/s of each speed optimisation in this codebase, timed round-robin in one process.

Each row times the same work with the optimisation off and on, alternating (off, on, off, on, ...) so
that the machine's drift hits both, and reports the median. Every adopted optimisation keeps the outputs
within float noise (tests/test_pinned.py pins the pipeline's outputs); rows marked "not adopted" were
measured and rejected (slower here, or bf16's coarser numerics for no gain).

    python -m benchmarks.optimisations                  # 256 px, batch 8, N = 5, this machine
    python -m benchmarks.optimisations --size 128

Writes benchmarks/results/optimisations_<device>.json and .md (override with --out).
"""
import argparse
import contextlib
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import torch

import common
import stage1_rcae
import stage2_dpn
import stage3_crd
from benchmarks.speed import round_robin


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="square image size")
    p.add_argument("--batch_size", type=int, default=8, help="images per call")
    p.add_argument("--depth", type=int, default=5, help="recursion depth N (paper: 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    p.add_argument("--malloc_probe", type=int, default=None, help=argparse.SUPPRESS)  # internal: child process
    args = p.parse_args(argv)
    common.check_flags(args, size=">=1", batch_size=">=1", depth=">=1", repeats=">=1")
    return args


def stage2_setup(args):
    """A frozen RcAE's N reconstructions of a fixed batch, and a DPN to train on them."""
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(depth=args.depth)).eval()
    with torch.no_grad():
        recons = rcae.reconstruct_all(x)  # (B, N, C, H, W)
    return x, recons, stage2_dpn.DPN(stage2_dpn.Config(depth=args.depth))


def malloc_probe(args):
    """Child process: stage-2 train steps under glibc's default (0) or with freed memory kept (1)."""
    common.keep_freed_memory(bool(args.malloc_probe))  # before any large allocation
    x, recons, dpn = stage2_setup(args)
    step = lambda: stage2_dpn.dpn_loss(dpn.refine(recons, x), x)[0].backward()  # noqa: E731
    print(f"SECONDS {round_robin({'step': step}, args.repeats, torch.device('cpu'))['step']}")


def fresh_process_times(args):
    """{before, after: median seconds} of the malloc setting, alternating fresh processes (A, B, A, B, ...):
    freed memory already kept in a process would serve the 'before' steps too."""
    times = {"before": [], "after": []}
    for _ in range(args.repeats):
        for k, keep in (("before", 0), ("after", 1)):
            res = subprocess.run([sys.executable, "-m", "benchmarks.optimisations", "--size", str(args.size),
                                  "--batch_size", str(args.batch_size), "--depth", str(args.depth),
                                  "--repeats", "2", "--malloc_probe", str(keep)], capture_output=True, text=True)
            if "SECONDS " not in res.stdout:
                raise RuntimeError(f"malloc probe failed: {res.stderr[-2000:]}")
            times[k].append(float(res.stdout.split("SECONDS ")[-1]))
    return {k: statistics.median(v) for k, v in times.items()}


def plain_cat(conv, *parts):
    """common.conv_cat as it was before: one conv over the materialised concat."""
    return conv(torch.cat(parts, 1))


def main(argv=None):
    args = get_args(argv)
    if args.malloc_probe is not None:
        return malloc_probe(args)
    common.get_device("cpu")  # the stages' runtime settings: denormals flushed, freed memory kept
    b, n, s = args.batch_size, args.depth, args.size
    x, recons, dpn = stage2_setup(args)
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(depth=n))
    crd = stage3_crd.CRD(stage3_crd.Config(depth=n))
    with torch.no_grad():
        crd_in = stage3_crd.crd_input(dpn.eval().refine(recons, x), x, crd.cfg.use_depths)  # (B, 2C, N, H, W)
    mask = (torch.rand(b, 1, s, s) > 0.99).float()

    def variant(fmt=None, cat=None, amp=False):
        """Context for one timed call: memory format of every block, the concat, bf16 autocast on the CPU."""
        stack = contextlib.ExitStack()
        for m in [*rcae.modules(), *dpn.modules(), crd]:
            if fmt == "plain" and hasattr(m, "memory_format"):  # ConvAE blocks and the CRD
                stack.callback(setattr, m, "memory_format", m.memory_format)
                m.memory_format = torch.contiguous_format
        if cat == "plain":
            stack.enter_context(mock.patch.object(common, "conv_cat", plain_cat))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp))
        return stack

    def stage1_step(**kw):  # one stage-1 training step at each depth 1..N (the sampled depth's range)
        with variant(**kw):
            for k in range(1, n + 1):
                stage1_rcae.recon_loss(rcae.train()(x, k).float(), x)[0].backward()

    def stage2_step(batched=False, **kw):  # DPN on the N depths of a frozen RcAE's reconstructions
        with variant(**kw):
            if batched:  # all depths folded into one batch of B*N
                res = dpn.ae(recons.flatten(0, 1), common.grad(x).repeat_interleave(n, 0)).view_as(recons)
            else:
                res = dpn(recons, x)
            stage2_dpn.dpn_loss((recons + res).float(), x)[0].backward()

    def crd_step(**kw):
        with variant(**kw):
            stage3_crd.crd_loss(crd.train().logits(crd_in).float(), mask)[0].backward()

    @torch.inference_mode()
    def crd_infer(**kw):
        with variant(**kw):
            crd.eval()(crd_in)

    @torch.inference_mode()
    def all_depths(shared):  # N separate recursions vs one compression path shared by all depths
        rcae.eval()
        return rcae.reconstruct_all(x) if shared else [rcae(x, k) for k in range(1, n + 1)]

    def full(mode):  # the full pipeline under autograd, no_grad, inference_mode
        det = stage3_crd.Detector(rcae.eval(), dpn.eval(), crd.eval())
        ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
        with ctx():
            det(x)

    def loader_step(workers):  # stage-1 training steps fed by the batch loader with 0 or 2 workers
        images = (torch.rand(64, 3, s, s) * 255).to(torch.uint8)
        model = stage1_rcae.RcAE(stage1_rcae.Config(depth=n))
        make = partial(stage1_rcae.make_batch, anomaly_prob=0.5, depth=n)
        loader = torch.utils.data.DataLoader(common.Batches(images, b, 0, 0, 4, make), batch_size=None,
                                             num_workers=workers)
        for batch in loader:
            stage1_rcae.loss_fn(model, batch)[0].backward()

    def pair(before, after):
        return {"before": before, "after": after}

    rows = []
    for name, fns, imgs in [
        ("stage-1 train step: channels_last", pair(partial(stage1_step, fmt="plain"), stage1_step), n * b),
        ("stage-2 train step: channels_last", pair(partial(stage2_step, fmt="plain"), stage2_step), b),
        ("CRD train step: channels_last_3d", pair(partial(crd_step, fmt="plain"), crd_step), b),
        ("CRD inference: channels_last_3d", pair(partial(crd_infer, fmt="plain"), crd_infer), b),
        ("stage-1 train step: concat inside the conv", pair(partial(stage1_step, cat="plain"), stage1_step), n * b),
        ("stage-2 train step: concat inside the conv", pair(partial(stage2_step, cat="plain"), stage2_step), b),
        ("CRD train step: concat inside the conv", pair(partial(crd_step, cat="plain"), crd_step), b),
        ("stage-2 train step: DPN per depth vs N depths in one batch",
         pair(partial(stage2_step, batched=True), stage2_step), b),
        ("all N reconstructions: shared compression", pair(partial(all_depths, False), partial(all_depths, True)), b),
        ("full pipeline: no_grad vs autograd", pair(partial(full, "grad"), partial(full, "no_grad")), b),
        ("full pipeline: inference_mode vs no_grad", pair(partial(full, "no_grad"), partial(full, "inference_mode")), b),
        ("stage-1 train step: bf16 autocast on the CPU (not adopted)", pair(stage1_step, partial(stage1_step, amp=True)), n * b),
        ("stage-2 train step: bf16 autocast on the CPU (not adopted)", pair(stage2_step, partial(stage2_step, amp=True)), b),
        ("stage-1 training: 2 loader workers vs 0 (not adopted)", pair(partial(loader_step, 0), partial(loader_step, 2)), 4 * b),
        ("stage-2 train step: freed memory kept (fresh processes)", fresh_process_times, b),
    ]:
        t = fns(args) if callable(fns) else round_robin(fns, args.repeats, torch.device("cpu"))
        row = dict(optimisation=name, before_images_per_s=round(imgs / t["before"], 3),
                   after_images_per_s=round(imgs / t["after"], 3), speedup=round(t["before"] / t["after"], 2))
        rows.append(row)
        print(f"{name:60s} {row['before_images_per_s']:9.2f} -> {row['after_images_per_s']:9.2f} img/s "
              f"(x{row['speedup']})", flush=True)
    device = f"cpu x{torch.get_num_threads()} threads"
    out = Path(args.out)
    common.write_json(out / "optimisations_cpu.json", dict(device=device, size=s, batch=b, depth=n, rows=rows))
    md = [f"{device}, {s}x{s}, batch {b}, N = {n}", "", "| optimisation | before img/s | after img/s | speed-up |",
          "|---|---|---|---|"] + [f"| {r['optimisation']} | {r['before_images_per_s']} | {r['after_images_per_s']} | "
                                  f"x{r['speedup']} |" for r in rows]
    common.write_text(out / "optimisations_cpu.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    common.run_main(main)
