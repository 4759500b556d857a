"""Speed report: images/s and achieved GFLOP/s of each stage's training step and of inference.

Each item's GFLOP/s is given as a share of two references:
- the theoretical peak, the physical limit: on the CPU, cores x clock x FP32 FLOPs per cycle (vector lanes
  x FMA units x 2) from /proc/cpuinfo, every input printed (cpu_peak; --clock_ghz and --fma_units override
  them); on CUDA, the datasheet's dense bf16 (tf32/fp32 without autocast) TFLOP/s. No share exceeds 100%:
  should a measurement beat it, the peak is raised to it, with a warning (within_peak).
- the measured peak, the best this software reaches here: the faster of a large matmul (MKL on the CPU,
  slow on AMD) and a large 3x3 convolution (oneDNN/cuDNN). Not a bound: an item can beat it.
Each item is timed round-robin with the two references (item, matmul, conv, item, ...), the median
reported, so both see the same drift of a shared machine. FLOPs are counted on one 64 px image by torch's
FlopCounterMode and scaled by the area (flops_per_image; 2 per multiply-add; convolutions and matmuls only,
so elementwise work is "free").

    python -m benchmarks.speed                                  # CPU: 128, 256, 512 px
    python -m benchmarks.speed --sizes 256 1024 --device cuda   # GPU: bf16 autocast, paper size
    python -m benchmarks.speed --sizes 256 --profile stage3     # torch.profiler table of one item
    python -m benchmarks.speed --optimisations 1 --sizes 256    # each speed choice of the code, off vs on (CPU)

Peak memory (CPU): each item once more in a fresh process, its peak RSS above the loaded and warmed-up
baseline, so items do not inherit each other's high-water mark; on CUDA, max_memory_allocated.
Writes benchmarks/results/speed_<device>.json and .md (override with --out), with the CPU model and the
load average at the start and the end.
Models are the defaults of each stage at random initialisation: speed does not depend on training.

--optimisations 1 instead times each speed choice in the model code with it off and on, alternating (off, on,
off, on, ...) in one process on the CPU, so the machine's drift hits both, and reports the medians
(optimisations). The adopted ones keep the outputs within float noise (tests/test_pinned.py pins the
pipeline's outputs); rows marked "not adopted" were measured and rejected. Writes optimisations_cpu.json and .md.
"""
import argparse
import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

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
    p.add_argument("--clock_ghz", type=float, default=None,
                   help="CPU clock for the theoretical peak (default: highest of cpufreq max, cpu MHz, model name)")
    p.add_argument("--fma_units", type=int, default=None,
                   help="FP32 vector FMA units per core for the theoretical peak (default: by ISA, see VECTOR_ISAS)")
    p.add_argument("--profile", default=None, help="print the torch.profiler table of this item and exit")
    p.add_argument("--memory", type=int, default=1, help="also measure each item's peak RSS in a subprocess (1/0)")
    p.add_argument("--optimisations", type=int, default=0,
                   help="1: time each speed choice of the model code off vs on instead, on the CPU (at --sizes)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one item's memory, in a child
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    common.check_flags(args, sizes=">=1", batch_size=">=1", depth=">=1", repeats=">=1", amp="0/1",
                       channels_last="0/1", compile="0/1", fair="0/1", fair_sizes=">=1", fair_base=">=1",
                       fair_batch=">=1", clock_ghz=">0", fma_units=">=1", memory="0/1", optimisations="0/1")
    return args


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


# --- the machine's peak
# FP32 lanes of a core's widest vector FMA and its FMA units, by the first flag found (x86 `flags`, Arm
# `Features` in /proc/cpuinfo). The units are the most that cores of that ISA have, so the peak stays an upper
# bound: 2 for AVX-512 (Skylake-SP to Sapphire Rapids; some Xeon Silver/Bronze have 1) and for AVX2 (Haswell
# on, AMD Zen), 4 for NEON (Neoverse V1/V2, Apple M; Neoverse N1 has 2). --fma_units overrides them.
VECTOR_ISAS = [("avx512f", "AVX-512", 16, 2), ("avx2", "AVX2", 8, 2), ("asimd", "NEON", 4, 4)]

# Dense TFLOP/s from NVIDIA's datasheets (bf16 and tf32 on tensor cores, fp32 on CUDA cores), by name; the
# first key found in torch.cuda.get_device_name wins. Other GPUs: the measured references only.
CUDA_SPECS = {"H100 PCIe": (756, 378, 51), "H100 NVL": (835, 418, 60), "H100": (989, 495, 67),
              "H200": (989, 495, 67), "A100": (312, 156, 19.5), "L4": (121, 60, 30.3), "RTX 4090": (165, 83, 83)}


def cpu_peak(cpuinfo, threads, affinity, max_mhz=None, clock_ghz=None, fma_units=None):
    """Theoretical FP32 FMA peak of the cores torch uses: cores x clock x FLOPs per cycle, from the text of
    /proc/cpuinfo; a dict of the result and every input. `affinity`: the logical CPUs this process may run
    on; hyperthreads of one core share its FMA units, so physical cores count. The clock is the highest
    known: `max_mhz` (cpufreq's boost limit), `cpu MHz`, the model name's "@ 2.60GHz", unless `clock_ghz`
    is given. None where no clock is known (pass --clock_ghz)."""
    cpus = []  # one dict per logical CPU this process may run on
    for block in cpuinfo.split("\n\n"):
        cpu = dict(map(str.strip, line.split(":", 1)) for line in block.splitlines() if ":" in line)
        if cpu.get("processor", "").isdigit() and int(cpu["processor"]) in affinity:
            cpus.append(cpu)
    if not cpus:
        return None
    first = cpus[0]
    model = first.get("model name") or first.get("Hardware") or first.get("CPU part", "unknown")
    flags = set((first.get("flags") or first.get("Features", "")).split())
    isa, lanes, units = next(((name, n, u) for flag, name, n, u in VECTOR_ISAS if flag in flags), ("scalar/SSE", 4, 2))
    if isa == "AVX-512" and first.get("vendor_id") == "AuthenticAMD" and first.get("cpu family") == "25":
        units = 1  # Zen 4 runs AVX-512 on its two 256-bit FMA units: one 512-bit FMA per cycle
    physical = {(c.get("physical id"), c.get("core id", c["processor"])) for c in cpus}
    name_ghz = re.search(r"@ *([0-9.]+) *GHz", model)
    clocks = {"cpufreq max": max_mhz and max_mhz / 1000,
              "cpu MHz": max((float(c["cpu MHz"]) / 1000 for c in cpus if "cpu MHz" in c), default=None),
              "model name": name_ghz and float(name_ghz.group(1))}
    src, ghz = ("--clock_ghz", clock_ghz) if clock_ghz else max(clocks.items(), key=lambda c: c[1] or 0)
    if not ghz:
        return None
    units = fma_units or units
    cores = min(threads, len(physical))
    return dict(model=model, isa=isa, cores=cores, clock_ghz=ghz, clock_source=src, fp32_lanes=lanes,
                fma_units=units, flops_per_cycle=2 * lanes * units, gflops=cores * ghz * 2 * lanes * units)


def read_cpu_peak(args):
    """cpu_peak of this machine (Linux); None elsewhere."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    affinity = os.sched_getaffinity(0)
    khz = [int(f.read_text()) for i in affinity
           if (f := Path(f"/sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq")).exists()]
    return cpu_peak(cpuinfo, torch.get_num_threads(), affinity, max(khz) / 1000 if khz else None,
                    args.clock_ghz, args.fma_units)


def cuda_peak(name, dtype):
    """The datasheet's dense peak of this GPU for the items' dtype (tf32 where cuDNN may use it for fp32)."""
    spec = next((v for k, v in CUDA_SPECS.items() if k in name), None)
    if spec is None:
        return None
    kind = "bf16" if dtype == torch.bfloat16 else "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return dict(model=name, dtype=kind, source="NVIDIA datasheet, dense", bf16_tflops=spec[0], tf32_tflops=spec[1],
                fp32_tflops=spec[2], gflops=1000 * spec[("bf16", "tf32", "fp32").index(kind)])


def within_peak(peak, best):
    """The theoretical peak, raised to `best` (the best GFLOP/s measured) where that is higher: the clock ran
    above the one read (turbo), or the core has more FMA units than assumed. Shares then stay at most 100%."""
    if peak is None or best <= peak["gflops"]:
        return peak
    print(f"warning: measured {best:.1f} GFLOP/s is above the theoretical peak {peak['gflops']:.1f}; the peak is "
          "raised to it (check --clock_ghz and --fma_units)", flush=True)
    out = {**peak, "gflops": best, "raised_from_gflops": peak["gflops"]}
    if "clock_ghz" in peak:
        out["clock_ghz"] = best / (peak["cores"] * peak["flops_per_cycle"])
        out["clock_source"] += ", raised to match the measurement"
    return out


def reference_items(device, dtype):
    """{name: (fn, FLOPs per call)}: a large square matmul and a large 3x3 convolution (oneDNN on the CPU,
    cuDNN on CUDA, channels_last), the best measured speeds of this machine for the items' dtype. They are
    timed round-robin with each item, so they see the same drift of a shared machine."""
    cpu = device.type == "cpu"
    n, mm_calls = (2048, 3) if cpu else (8192, 8)
    (b, c, s), conv_calls = ((8, 256, 64), 1) if cpu else ((64, 512, 64), 8)
    a, w = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(b, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def matmul():
        for _ in range(mm_calls):
            a @ w

    @torch.inference_mode()
    def convolution():
        for _ in range(conv_calls):
            conv(x)
    return {"matmul": (matmul, 2 * n ** 3 * mm_calls), "conv": (convolution, 2 * b * c * c * 9 * s * s * conv_calls)}


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
                _, _, inp = stage3_crd.frozen_forward(rcae, dpn, x, crd.cfg.use_depths, crd.cfg.crd_input)
            loss, _ = stage3_crd.crd_loss(net["crd"].logits(inp).float(), mask)
        loss.backward()

    detector = stage3_crd.Detector(rcae.eval(), dpn.eval(), crd.eval())

    @torch.inference_mode()
    def infer():  # the full pipeline: every depth's reconstruction, DPN, CRD map, image score
        with amp():
            stage3_crd.topk_mean(detector(x)["map"].float(), 0.01)

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


def flops_per_image(m, size, args, device, at=64):
    """{item: FLOPs per image}, counted on one image at `at` px and scaled by the area. Every network is
    convolutional and `at` is a multiple of its total downsampling (2^N for RcAE, 16 for FAIR), so FLOPs are
    linear in the batch and in H x W (tests/test_benchmarks.py checks it). Counting at full size took more
    memory than the timed calls (FlopCounterMode: 2.8 GiB for the CRD step at 256 px, batch 1 or 8)."""
    at = max(at, 2 ** args.depth)
    at = at if size % at == 0 else size
    small = argparse.Namespace(**{**vars(args), "batch_size": 1, "fair_sizes": [at] if size in args.fair_sizes else []})
    its = items(m, at, small, device)
    return {k: count_flops(fn, args.depth if "stage1" in k else 1) * (size / at) ** 2 for k, (fn, _) in its.items()}


def argv_of(args):
    """The flags a probe child needs to rebuild the same items."""
    return ["--batch_size", str(args.batch_size), "--depth", str(args.depth), "--device", args.device,
            "--amp", str(args.amp), "--channels_last", str(args.channels_last), "--fair", str(args.fair),
            "--fair_batch", str(args.fair_batch), "--fair_sizes", *map(str, args.fair_sizes),
            "--fair_base", str(args.fair_base)]


# ----------------------------------------------------------------------------- --optimisations 1


def plain_cat(conv, *parts):
    """common.conv_cat without the optimisation: one conv over the materialised concat."""
    return conv(torch.cat(parts, 1))


def optimisation_rows(args, size):
    """[(name, {"before": fn, "after": fn}, images per call)]: each speed choice of the model code off (before)
    and on (after) at `size` on the CPU, on fresh random models and one fixed batch."""
    torch.manual_seed(0)
    b, n = args.batch_size, args.depth
    x = torch.rand(b, 3, size, size)
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(depth=n))
    dpn = stage2_dpn.DPN(stage2_dpn.Config(depth=n))
    crd = stage3_crd.CRD(stage3_crd.Config(depth=n))
    with torch.no_grad():
        recons = rcae.eval().reconstruct_all(x)  # (B, N, C, H, W)
        crd_in = stage3_crd.crd_input(dpn.eval().refine(recons, x), x, crd.cfg.use_depths)  # (B, 2C, N, H, W)
    mask = (torch.rand(b, 1, size, size) > 0.99).float()

    def variant(fmt=None, cat=None, amp=False):
        """Context for one timed call: the blocks' memory format, the concat, bf16 autocast on the CPU."""
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
                g = common.image_gradient(x).repeat_interleave(n, 0)  # (B*N, 2C, H, W)
                res = dpn.ae(recons.flatten(0, 1), g).view_as(recons)  # (B, N, C, H, W)
            else:
                res = dpn(recons, x)  # one depth at a time (DPN.forward)
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
        images = (torch.rand(4 * b, 3, size, size) * 255).to(torch.uint8)
        make = partial(stage1_rcae.make_batch, depth=n, anomaly_prob=0.5)
        loader = torch.utils.data.DataLoader(common.Batches(images, b, 0, 0, 4, make), batch_size=None,
                                             num_workers=workers)
        for batch in loader:
            stage1_rcae.loss_fn(rcae.train(), batch)[0].backward()

    def pair(before, after):
        return {"before": before, "after": after}

    return [
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
        ("full pipeline: inference_mode vs no_grad", pair(partial(full, "no_grad"), partial(full, "inference_mode")),
         b),
        ("stage-1 train step: bf16 autocast on the CPU (not adopted)",
         pair(stage1_step, partial(stage1_step, amp=True)), n * b),
        ("stage-2 train step: bf16 autocast on the CPU (not adopted)",
         pair(stage2_step, partial(stage2_step, amp=True)), b),
        ("stage-1 training: 2 loader workers vs 0 (not adopted)",
         pair(partial(loader_step, 0), partial(loader_step, 2)), 4 * b),
    ]


def optimisations(args):
    """--optimisations 1: every row of optimisation_rows at each of --sizes, before and after timed round-robin;
    writes <out>/optimisations_cpu.json and .md."""
    common.get_device("cpu")  # the stages' runtime setting: denormal floats flushed
    cpu, b, n, rows = torch.device("cpu"), args.batch_size, args.depth, []
    for size in args.sizes:
        for name, fns, imgs in optimisation_rows(args, size):
            t = round_robin(fns, args.repeats, cpu)
            rows.append(dict(size=size, optimisation=name, before_images_per_s=round(imgs / t["before"], 3),
                             after_images_per_s=round(imgs / t["after"], 3),
                             speedup=round(t["before"] / t["after"], 2)))
            r = rows[-1]
            print(f"{size:5d}px  {name:60s} {r['before_images_per_s']:9.2f} -> {r['after_images_per_s']:9.2f} img/s "
                  f"(x{r['speedup']})", flush=True)
    device = f"cpu x{torch.get_num_threads()} threads"
    out = Path(args.out)
    common.write_json(out / "optimisations_cpu.json", dict(device=device, sizes=args.sizes, batch=b, depth=n,
                                                           load_average=load_average(), rows=rows))
    md = [f"{device}, batch {b}, N = {n}", "", "| size | optimisation | before img/s | after img/s | speed-up |",
          "|---|---|---|---|---|"] + [f"| {r['size']} | {r['optimisation']} | {r['before_images_per_s']} | "
                                      f"{r['after_images_per_s']} | x{r['speedup']} |" for r in rows]
    common.write_text(out / "optimisations_cpu.md", "\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None):
    args = get_args(argv)
    if args.optimisations:
        return optimisations(args)
    device = common.get_device(args.device)
    torch.manual_seed(0)
    m = models(args.depth, device, args)
    if args.probe:
        return probe(args, device, m, args.sizes[0])
    dtype = torch.bfloat16 if device.type == "cuda" and args.amp else torch.float32
    if device.type == "cuda":
        model = torch.cuda.get_device_name(device)
        peak = cuda_peak(model, dtype)
    else:
        peak = read_cpu_peak(args) if device.type == "cpu" else None  # mps: the measured references only
        model = peak["model"] if peak else device.type
    load_start = load_average()
    print(f"device {device}: {model} ({torch.get_num_threads()} threads), load average {load_start}\n{peak_line(peak)}")
    refs = reference_items(device, dtype)
    params = {k: common.n_params(v) for k, v in m.items()}
    rows = []
    for size in args.sizes:
        its = items(m, size, args, device)
        if args.profile:
            fn = next(v[0] for k, v in its.items() if args.profile.lower() in k.lower())
            fn()
            with torch.profiler.profile() as prof:
                fn()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            return
        per_image = flops_per_image(m, size, args, device)
        for k, (fn, imgs) in its.items():
            flops = per_image[k] * imgs  # one item at a time, round-robin with the references
            times = round_robin({k: fn, **{r: f for r, (f, _) in refs.items()}}, args.repeats, device)
            ref = {r: refs[r][1] / times[r] / 1e9 for r in refs}
            mem = peak_mb(k, size, argv_of(args)) if args.memory and device.type == "cpu" else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
            gflops = flops / times[k] / 1e9
            rows.append(dict(item=k, size=size, batch=imgs, images_per_s=round(imgs / times[k], 3),
                             gflop_per_image=round(flops / imgs / 1e9, 3), gflop_per_s=round(gflops, 1),
                             matmul_gflops=round(ref["matmul"], 1), conv_gflops=round(ref["conv"], 1),
                             pct_of_measured=round(100 * gflops / max(ref.values()), 1),
                             peak_mem_mb=None if mem is None else round(mem, 1)))
            of_peak = f"{100 * gflops / peak['gflops']:5.1f}% of theoretical, " if peak else ""
            print(f"{size:5d}px  {k:24s} {imgs / times[k]:9.2f} img/s  {flops / imgs / 1e9:8.2f} GFLOP/img  "
                  f"{gflops:7.1f} GFLOP/s  {of_peak}{rows[-1]['pct_of_measured']:5.1f}% of measured (matmul "
                  f"{ref['matmul']:.0f}, conv {ref['conv']:.0f})  {mem or 0:7.0f} MiB", flush=True)
    measured = {r: statistics.median(row[f"{r}_gflops"] for row in rows) for r in refs}
    peak = within_peak(peak, max(max(row[f"{r}_gflops"], row["gflop_per_s"]) for row in rows for r in refs))
    for row in rows:
        row["pct_of_theoretical"] = round(100 * row["gflop_per_s"] / peak["gflops"], 1) if peak else None
    report = dict(device=str(device), device_name=f"{model}, {torch.get_num_threads()} threads",
                  load_average={"start": load_start, "end": load_average()},
                  theoretical_peak=peak, measured_peak_gflops={k: round(v, 1) for k, v in measured.items()},
                  params=params,
                  settings={k: getattr(args, k) for k in ("batch_size", "depth", "amp", "channels_last", "compile")},
                  rows=rows)
    out = Path(args.out)
    tag = f"{device.type}" + ("_cl" if args.channels_last else "") + ("_compile" if args.compile else "")
    common.write_json(out / f"speed_{tag}.json", report)
    md = [f"device: {report['device_name']}; batch {args.batch_size} (FAIR {min(args.fair_batch, args.batch_size)}), "
          f"N = {args.depth}; load average (1, 5, 15 min) {load_start} at the start, {report['load_average']['end']} "
          "at the end", "", peak_line(peak),
          "measured (median GFLOP/s over the items' round robins): "
          + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()), "",
          "| size | item | images/s | GFLOP/image | GFLOP/s | % of theoretical peak | % of measured peak "
          "| peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['size']} | {r['item']} | {r['images_per_s']} | {r['gflop_per_image']} | {r['gflop_per_s']} | "
           f"{'' if r['pct_of_theoretical'] is None else r['pct_of_theoretical']} | {r['pct_of_measured']} | "
           f"{'' if r['peak_mem_mb'] is None else round(r['peak_mem_mb'])} |" for r in rows]
    md += ["", "% of measured peak: against the faster of the matmul and the convolution timed round-robin with that "
           "item", "", "peak memory: CPU, peak RSS of one call in a fresh process above its loaded, warmed-up "
           "baseline; CUDA, torch.cuda.max_memory_allocated of one call"]
    md += ["", "parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items())]
    common.write_text(out / f"speed_{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


def load_average():
    """The 1, 5 and 15 minute load averages: how busy the machine was around the timings."""
    return [round(v, 2) for v in os.getloadavg()]


def peak_line(peak):
    """The theoretical peak and the numbers it comes from, for the report."""
    if peak is None:
        return "theoretical peak: unknown here (no clock in /proc/cpuinfo, or a GPU without a datasheet entry)"
    if "clock_ghz" not in peak:
        return (f"theoretical peak: {peak['gflops'] / 1000:.0f} TFLOP/s {peak['dtype']} ({peak['source']}; bf16 "
                f"{peak['bf16_tflops']}, tf32 {peak['tf32_tflops']}, fp32 {peak['fp32_tflops']} TFLOP/s)")
    return (f"theoretical FP32 peak: {peak['gflops']:.1f} GFLOP/s = {peak['cores']} cores x "
            f"{peak['clock_ghz']:.2f} GHz ({peak['clock_source']}) x {peak['flops_per_cycle']} FLOP/cycle "
            f"({peak['isa']}: {peak['fp32_lanes']} lanes x {peak['fma_units']} FMA units x 2)")


if __name__ == "__main__":
    common.run_main(main)
