"""Speed report: images/s and achieved GFLOP/s of each stage's training step and of inference.

Every number is measured in this process against the machine's own peak, a large matmul (fp32 on CPU;
bf16 on CUDA) timed as one more item. Items are timed round-robin (A, B, C, A, B, C, ...) and the median
is reported, because a shared machine's speed drifts: the peak of each size sees the same drift. FLOPs
are counted by torch's FlopCounterMode (2 per multiply-add; convolutions and matmuls only, so elementwise
work is "free" in GFLOP/s).

    python -m benchmarks.speed                                  # CPU: 128, 256, 512 px
    python -m benchmarks.speed --sizes 256 1024 --device cuda   # GPU: bf16 autocast, paper size
    python -m benchmarks.speed --sizes 256 --profile stage3     # torch.profiler table of one item

Peak memory (CPU): each item once more in a fresh process, its peak RSS above the loaded and warmed-up
baseline, so items do not inherit each other's high-water mark; on CUDA, max_memory_allocated.
Writes benchmarks/results/speed_<device>.json and .md (override with --out).
Models are the defaults of each stage at random initialisation: speed does not depend on training.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import stage1_rcae
import stage2_dpn
import stage3_crd
from baselines import fair


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="square image sizes")
    p.add_argument("--batch_size", type=int, default=8, help="images per step (the stages' default)")
    p.add_argument("--depth", type=int, default=5, help="recursion depth N (paper: 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per item (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", type=int, default=1, help="bf16 autocast on CUDA (1/0)")
    p.add_argument("--channels_last", type=int, default=0, help="channels_last memory format (1/0)")
    p.add_argument("--compile", type=int, default=0, help="torch.compile the networks (1/0)")
    p.add_argument("--fair", type=int, default=1, help="also time the FAIR baseline (base 128) (1/0)")
    p.add_argument("--fair_sizes", type=int, nargs="+", default=[256], help="sizes at which FAIR is timed")
    p.add_argument("--fair_base", type=int, default=128, help="FAIR UNet base width (paper: 128)")
    p.add_argument("--fair_batch", type=int, default=2, help="FAIR batch (it is ~70x larger than RcAE)")
    p.add_argument("--profile", default=None, help="print the torch.profiler table of this item and exit")
    p.add_argument("--memory", type=int, default=1, help="also measure each item's peak RSS in a subprocess (1/0)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one item's memory, in a child
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    return p.parse_args(argv)


def round_robin(fns, repeats, device):
    """{name: fn} -> {name: median seconds of one call}: one warm-up call each, then `repeats` rounds
    calling every fn in turn (A, B, C, A, B, C, ...), so drift on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_item(device, calls=8):
    """(fn, FLOPs per call) of a large square matmul, fp32 on CPU, bf16 on CUDA: the machine's peak. It is
    timed round-robin with the items, so the peak and the items see the same drift of a shared machine."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def fn():
        for _ in range(calls):
            a @ b
    return fn, 2 * n ** 3 * calls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def models(depth, device, args):
    """The three stages at their default widths (random init), plus FAIR's UNet."""
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(depth=depth))
    dpn = stage2_dpn.DPN(stage2_dpn.Config(depth=depth))
    crd = stage3_crd.CRD(stage3_crd.Config(depth=depth))
    out = {"rcae": rcae, "dpn": dpn, "crd": crd}
    if args.fair:
        out["fair"] = fair.FAIR(fair.Config(base=args.fair_base))
    for m in out.values():
        m.to(device)
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
    return out


def items(m, size, args, device):
    """name -> (closure running one step on a fixed batch, images per call)."""
    b, n = args.batch_size, args.depth
    x = torch.rand(b, 3, size, size, device=device)
    mask = (torch.rand(b, 1, size, size, device=device) > 0.99).float()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rcae, dpn, crd = m["rcae"], m["dpn"], m["crd"]
    net = {k: torch.compile(v) if args.compile else v for k, v in m.items()}
    amp = lambda: common.autocast(device, args.amp)  # noqa: E731
    depth_cycle = iter(range(10 ** 9))

    def stage1():  # one optimiser-free train step; depth cycles through 1..N like the sampled depth
        rcae.train().requires_grad_(True)
        k = next(depth_cycle) % n + 1
        with amp():
            loss, _ = stage1_rcae.recon_loss(net["rcae"](x, k).float(), x)
        loss.backward()

    def stage2():
        rcae.eval().requires_grad_(False)
        dpn.train().requires_grad_(True)
        with amp():
            with torch.no_grad():
                recons = rcae.reconstruct_all(x)  # (B, N, C, H, W)
            loss, _ = stage2_dpn.dpn_loss(net["dpn"].refine(recons, x).float(), x)
        loss.backward()

    def stage3():
        rcae.eval().requires_grad_(False)
        dpn.eval().requires_grad_(False)
        crd.train().requires_grad_(True)
        with amp():
            with torch.no_grad():
                _, _, inp = stage3_crd.frozen_forward(rcae, dpn, x, crd.cfg.use_depths)
            loss, _ = stage3_crd.crd_loss(net["crd"].logits(inp).float(), mask)
        loss.backward()

    detector = stage3_crd.Detector(rcae.eval(), dpn.eval(), crd.eval())

    @torch.inference_mode()
    def infer():  # the full pipeline: every depth's reconstruction, DPN, CRD map, image score
        with amp():
            common.topk_mean(detector(x)["map"].float(), 0.01)

    @torch.inference_mode()
    def infer_rcae():  # evaluate.py's `rcae` variant: the depth-N reconstruction only
        with amp():
            rcae(x)

    @torch.inference_mode()
    def infer_all_depths():  # stage 1 alone: every depth n = 1..N, sharing the compression path
        with amp():
            rcae.reconstruct_all(x)

    @torch.inference_mode()
    def infer_dpn():  # evaluate.py's `rcae+dpn` variant: depth N, refined by DPN
        with amp():
            dpn.refine(rcae(x)[:, None], x)

    out = {"train stage1 RcAE": (stage1, b), "train stage2 DPN": (stage2, b), "train stage3 CRD": (stage3, b),
           "infer RcAE, all N depths": (infer_all_depths, b),
           "infer rcae (I_R^N)": (infer_rcae, b), "infer rcae+dpn (I_D^N)": (infer_dpn, b),
           "infer RcAE+DPN+CRD": (infer, b)}
    if args.fair and size in args.fair_sizes:
        fb = min(args.fair_batch, b)
        xf = x[:fb]
        f = m["fair"]

        def fair_train():
            f.train().requires_grad_(True)
            with amp():
                loss, _ = fair.fair_loss(net["fair"](xf).float(), xf)
            loss.backward()

        @torch.inference_mode()
        def fair_infer():
            f.eval()
            with amp():
                fair.fair_maps(f, {"args": {}}, xf)

        out["train FAIR"] = (fair_train, fb)
        out["infer FAIR"] = (fair_infer, fb)
    return out


def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2 ** 20


def hwm_mb():
    """Peak RSS since the last reset (VmHWM)."""
    line = next(s for s in open("/proc/self/status") if s.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def probe(args, device, m, size):
    """Child process: one call of one item; prints its peak RSS above the warmed-up, loaded baseline."""
    args.fair_sizes = [*args.fair_sizes, 64]
    items(m, 64, args, device)[args.probe][0]()  # loads the kernels' libraries (part of the baseline)
    fn = items(m, size, args, device)[args.probe][0]
    base = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS, so earlier transients do not count
    fn()
    print(f"PEAK {hwm_mb() - base:.1f}")


def peak_mb(item, size, argv):
    """Peak RSS (MiB, above baseline) of one call of `item` at `size`, in a fresh process; None off Linux."""
    if not Path("/proc/self/statm").exists():
        return None
    res = subprocess.run([sys.executable, "-m", "benchmarks.speed", *argv, "--sizes", str(size), "--probe", item],
                         capture_output=True, text=True)
    lines = [s for s in res.stdout.splitlines() if s.startswith("PEAK ")]
    return float(lines[-1].split()[1]) if lines else None


def count_flops(fn, calls=1):
    with FlopCounterMode(display=False) as fc:
        for _ in range(calls):
            fn()
    return fc.get_total_flops() / calls


def argv_of(args):
    """The flags a probe child needs to rebuild the same items."""
    return ["--batch_size", str(args.batch_size), "--depth", str(args.depth), "--device", args.device,
            "--amp", str(args.amp), "--channels_last", str(args.channels_last), "--fair", str(args.fair),
            "--fair_batch", str(args.fair_batch), "--fair_sizes", *map(str, args.fair_sizes), "--fair_base", str(args.fair_base)]


def main(argv=None):
    args = get_args(argv)
    device = common.get_device(args.device)
    torch.manual_seed(0)
    m = models(args.depth, device, args)
    if args.probe:
        return probe(args, device, m, args.sizes[0])
    print(f"device {device} ({torch.get_num_threads()} threads)")
    matmul, matmul_flops = matmul_item(device)
    params = {k: common.n_params(v) for k, v in m.items()}
    rows, peaks = [], []
    for size in args.sizes:
        its = items(m, size, args, device)
        if args.profile:
            fn = next(v[0] for k, v in its.items() if args.profile.lower() in k.lower())
            fn()
            with torch.profiler.profile() as prof:
                fn()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            return
        flops = {k: count_flops(fn, 1 if "stage1" not in k else args.depth) for k, (fn, _) in its.items()}
        common.release_memory()  # the counting pass's blocks (the round robin below peaks near 21 GiB at 512 px)
        times = round_robin({**{k: fn for k, (fn, _) in its.items()}, "matmul": matmul}, args.repeats, device)
        peak = matmul_flops / times["matmul"] / 1e9
        peaks.append(peak)
        print(f"{size:5d}px  matmul peak {peak:.1f} GFLOP/s, timed round-robin with the items", flush=True)
        common.release_memory()  # before the memory probes' child processes, and the next size's items
        for k, (_, imgs) in its.items():
            t = times[k]
            gflops = flops[k] / t / 1e9
            mem = peak_mb(k, size, argv_of(args)) if args.memory and device.type == "cpu" else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                its[k][0]()
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
            rows.append(dict(item=k, size=size, batch=imgs, images_per_s=round(imgs / t, 3),
                             matmul_peak_gflops=round(peak, 1), gflop_per_image=round(flops[k] / imgs / 1e9, 3),
                             gflop_per_s=round(gflops, 1),
                             pct_of_peak=round(100 * gflops / peak, 1), peak_mem_mb=None if mem is None else round(mem, 1)))
            print(f"{size:5d}px  {k:24s} {imgs / t:9.2f} img/s  {flops[k] / imgs / 1e9:8.2f} GFLOP/img  "
                  f"{gflops:7.1f} GFLOP/s  {100 * gflops / peak:5.1f}% of peak  {mem or 0:7.0f} MiB", flush=True)
    report = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"cpu x{torch.get_num_threads()} threads", matmul_peak_gflops=round(statistics.median(peaks), 1),
                  params=params,
                  settings={k: getattr(args, k) for k in ("batch_size", "depth", "amp", "channels_last", "compile")},
                  rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{device.type}" + ("_cl" if args.channels_last else "") + ("_compile" if args.compile else "")
    (out / f"speed_{tag}.json").write_text(json.dumps(report, indent=1))
    md = [f"device: {report['device_name']}; batch {args.batch_size} (FAIR {min(args.fair_batch, args.batch_size)}), "
          f"N = {args.depth}; matmul peak (GFLOP/s, timed round-robin with the items) "
          + ", ".join(f"{s} px: {p:.1f}" for s, p in zip(args.sizes, peaks)), "",
          "| size | item | images/s | GFLOP/image | GFLOP/s | % of matmul peak | peak memory MiB |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['size']} | {r['item']} | {r['images_per_s']} | {r['gflop_per_image']} | {r['gflop_per_s']} | "
           f"{r['pct_of_peak']} | {'' if r['peak_mem_mb'] is None else round(r['peak_mem_mb'])} |" for r in rows]
    md += ["", "peak memory: CPU, peak RSS of one call in a fresh process above its loaded, warmed-up baseline; "
           "CUDA, torch.cuda.max_memory_allocated of one call"]
    md += ["", "parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items())]
    (out / f"speed_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    common.run_main(main)
