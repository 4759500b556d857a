"""The benchmark scripts run end to end (tiny sizes; their numbers are not checked here, only produced)."""
import json

import torch

from benchmarks import compare, optimisations, speed


def test_speed_report(tmp_path):
    argv = ["--repeats", "1", "--depth", "3", "--batch_size", "2", "--fair_sizes", "32", "--fair_batch", "1",
            "--fair_base", "8"]
    speed.main(argv + ["--sizes", "32", "--memory", "0", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "speed_cpu.json").read_text())
    items = {r["item"] for r in rep["rows"]}
    assert {"train stage1 RcAE", "train stage3 CRD", "infer RcAE+DPN+CRD", "infer FAIR"} <= items
    assert rep["measured_peak_gflops"]["matmul"] > 0 and all(r["gflop_per_image"] > 0 for r in rep["rows"])
    assert len(rep["load_average"]["start"]) == 3 and rep["theoretical_peak"]["model"]
    assert all(0 <= r["pct_of_theoretical"] <= 100 for r in rep["rows"])
    # the memory probe: one item in a fresh process, a number (MiB) that grows with the image size
    small, large = (speed.peak_mb("infer RcAE+DPN+CRD", s, argv) for s in (32, 128))
    assert small is not None and large > small


def test_optimisations_report(tmp_path):
    optimisations.main(["--size", "32", "--batch_size", "2", "--depth", "3", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "optimisations_cpu.json").read_text())["rows"]
    assert len(rows) == 15 and all(r["before_images_per_s"] > 0 and r["after_images_per_s"] > 0 for r in rows)


def test_compare_smoke(toy_data, tmp_path):
    compare.main(["--data", toy_data, "--out", str(tmp_path), "--budget-min", "0.02", "--image_size", "32",
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4", "--workers", "0"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert [r["variant"] for r in rep["rows"]] == ["crd", "rcae+dpn", "rcae", "fair"]
    assert set(rep["budget_steps"]) == {"stage1_rcae", "stage2_dpn", "stage3_crd", "fair"}
    assert rep["steps"] == rep["budget_steps"]  # every method trained exactly its share of the budget
    assert (tmp_path / "compare.md").read_text().count("\n| ") == 5


def test_flops_scale_with_batch_and_area():
    # the report counts FLOPs on one 64 px image and scales them; counted directly on a batch at 128 px they agree
    args = speed.get_args(["--depth", "3", "--batch_size", "2", "--fair_sizes", "128", "--fair_base", "8"])
    device = torch.device("cpu")
    m = speed.models(args.depth, device, args)
    scaled = speed.flops_per_image(m, 128, args, device)
    direct = {k: speed.count_flops(fn, 3 if "stage1" in k else 1) / imgs
              for k, (fn, imgs) in speed.items(m, 128, args, device).items()}
    assert scaled.keys() == direct.keys() and "infer FAIR" in scaled
    assert all(abs(scaled[k] - direct[k]) <= 1e-9 * direct[k] for k in direct)


# /proc/cpuinfo of a 2-core, 4-thread AVX-512 Xeon, idling at 1.2 GHz (fields trimmed)
XEON = "".join(f"""processor\t: {i}
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
cpu MHz\t\t: 1200.000
physical id\t: 0
core id\t\t: {i % 2}
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw

""" for i in range(4))


def test_cpu_peak_arithmetic():
    # hyperthreads share a core's FMA units; the clock is the highest known (model name's 2.9 over cpu MHz)
    peak = speed.cpu_peak(XEON, threads=4, affinity={0, 1, 2, 3})
    assert (peak["cores"], peak["clock_ghz"], peak["clock_source"], peak["isa"]) == (2, 2.9, "model name", "AVX-512")
    assert peak["flops_per_cycle"] == 64 and peak["gflops"] == 2 * 2.9 * 16 * 2 * 2
    assert speed.cpu_peak(XEON, threads=4, affinity={0, 2})["cores"] == 1  # two threads of core 0
    assert speed.cpu_peak(XEON, threads=1, affinity={0, 1, 2, 3})["cores"] == 1
    assert speed.cpu_peak(XEON, 2, {0, 1}, max_mhz=3500)["gflops"] == 2 * 3.5 * 64  # cpufreq's boost limit
    assert speed.cpu_peak(XEON, 2, {0, 1}, max_mhz=3500, clock_ghz=2.0, fma_units=1)["gflops"] == 2 * 2.0 * 32
    amd = XEON.replace("GenuineIntel", "AuthenticAMD").replace("cpu family\t: 6", "cpu family\t: 25")
    assert speed.cpu_peak(amd, 2, {0, 1})["flops_per_cycle"] == 32  # Zen 4: AVX-512 on 256-bit units
    avx2 = XEON.replace(" avx512f avx512bw", "")
    assert speed.cpu_peak(avx2, 2, {0, 1})["flops_per_cycle"] == 32
    arm = "processor\t: 0\nFeatures\t: fp asimd\n\nprocessor\t: 1\nFeatures\t: fp asimd\n"
    assert speed.cpu_peak(arm, 2, {0, 1}) is None  # no clock in an Arm cpuinfo: cpufreq or --clock_ghz
    assert speed.cpu_peak(arm, 2, {0, 1}, max_mhz=3000)["gflops"] == 2 * 3.0 * 2 * 4 * 4
    # a measurement above the theoretical peak raises it (clock), so no share exceeds 100%
    peak = speed.cpu_peak(XEON, 2, {0, 1})
    raised = speed.within_peak(peak, 1.5 * peak["gflops"])
    assert raised["gflops"] == raised["cores"] * raised["clock_ghz"] * raised["flops_per_cycle"] == 1.5 * peak["gflops"]
    assert speed.within_peak(peak, 0.5 * peak["gflops"]) is peak
