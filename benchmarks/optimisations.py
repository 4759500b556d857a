"""Before/after images/s of each speed optimisation in this codebase, timed round-robin in one process.

Each row times the same work with the optimisation off and on, alternating (off, on, off, on, ...) so
that the machine's drift hits both, and reports the median. Outputs agree within float noise in every
case (tests/test_pinned.py pins the pipeline's outputs).

    python -m benchmarks.optimisations                  # 256 px, batch 8, N = 5, this machine
    python -m benchmarks.optimisations --size 128

Writes benchmarks/results/optimisations_<device>.json and .md (override with --out).
"""
import argparse
import json
from functools import partial
from pathlib import Path

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
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(0)
    b, n, s = args.batch_size, args.depth, args.size
    x = torch.rand(b, 3, s, s)
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(depth=n)).eval()
    dpn = stage2_dpn.DPN(stage2_dpn.Config(depth=n)).eval()
    crd = stage3_crd.CRD(stage3_crd.Config(depth=n))
    with torch.no_grad():
        recons = rcae.reconstruct_all(x)  # (B, N, C, H, W)
        crd_in = stage3_crd.crd_input(dpn.refine(recons, x), x, crd.cfg.use_depths)  # (B, 2C, N, H, W)
    mask = (torch.rand(b, 1, s, s) > 0.99).float()

    def crd_step(fmt):
        crd.memory_format = fmt
        stage3_crd.crd_loss(crd(crd_in), mask)[0].backward()

    @torch.inference_mode()
    def crd_infer(fmt):
        crd.memory_format = fmt
        crd(crd_in)

    @torch.inference_mode()
    def all_depths(shared):  # N separate recursions vs one compression path shared by all depths
        return rcae.reconstruct_all(x) if shared else [rcae(x, k) for k in range(1, n + 1)]

    @torch.inference_mode()
    def dpn_depths(batched):  # DPN over the N depths one by one vs folded into one batch
        return dpn.refine(recons, x) if batched else [dpn.refine(recons[:, k:k + 1], x) for k in range(n)]

    def full(mode):  # the full pipeline under autograd, no_grad, inference_mode
        det = stage3_crd.Detector(rcae, dpn, crd.eval())
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

    rows = []
    for name, fns, imgs in [
        ("CRD train step: channels_last_3d", {"before": partial(crd_step, torch.contiguous_format),
                                              "after": partial(crd_step, torch.channels_last_3d)}, b),
        ("CRD inference: channels_last_3d", {"before": partial(crd_infer, torch.contiguous_format),
                                             "after": partial(crd_infer, torch.channels_last_3d)}, b),
        ("all N reconstructions: shared compression", {"before": partial(all_depths, False),
                                                       "after": partial(all_depths, True)}, b),
        ("DPN on N depths: one batched call", {"before": partial(dpn_depths, False),
                                               "after": partial(dpn_depths, True)}, b),
        ("full pipeline: no_grad vs autograd", {"before": partial(full, "grad"), "after": partial(full, "no_grad")}, b),
        ("full pipeline: inference_mode vs no_grad", {"before": partial(full, "no_grad"),
                                                      "after": partial(full, "inference_mode")}, b),
        ("stage-1 training: 2 loader workers vs 0", {"before": partial(loader_step, 0),
                                                     "after": partial(loader_step, 2)}, 4 * b),
    ]:
        t = round_robin(fns, args.repeats, torch.device("cpu"))
        row = dict(optimisation=name, before_images_per_s=round(imgs / t["before"], 3),
                   after_images_per_s=round(imgs / t["after"], 3), speedup=round(t["before"] / t["after"], 2))
        rows.append(row)
        print(f"{name:45s} {row['before_images_per_s']:9.2f} -> {row['after_images_per_s']:9.2f} img/s "
              f"(x{row['speedup']})", flush=True)
    device = f"cpu x{torch.get_num_threads()} threads"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimisations_cpu.json").write_text(json.dumps(dict(device=device, size=s, batch=b, depth=n, rows=rows),
                                                           indent=1))
    md = [f"{device}, {s}x{s}, batch {b}, N = {n}", "", "| optimisation | before img/s | after img/s | speed-up |",
          "|---|---|---|---|"] + [f"| {r['optimisation']} | {r['before_images_per_s']} | {r['after_images_per_s']} | "
                                  f"x{r['speedup']} |" for r in rows]
    (out / "optimisations_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    common.run_main(main)
