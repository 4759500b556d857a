"""The benchmark scripts run end to end (tiny sizes; their numbers are not checked here, only produced)."""
import json

import torch

import common
from benchmarks import ablations, compare, optimisations, speed


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
    compare.main(["--data", toy_data, "--out", str(tmp_path), "--budget_min", "0.02", "--image_size", "32",
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4", "--workers", "0"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert [r["variant"] for r in rep["rows"]] == ["crd", "rcae+dpn", "rcae", "fair"]
    assert set(rep["budget_steps"]) == {"stage1_rcae", "stage2_dpn", "stage3_crd", "fair"}
    assert rep["steps"] == rep["budget_steps"]  # every method trained exactly its share of the budget
    assert (tmp_path / "compare.md").read_text().count("\n| ") == 5


def test_compare_explicit_steps(toy_data, tmp_path, capsys):
    compare.main(["--data", toy_data, "--out", str(tmp_path), "--steps", "3,2,2,1", "--image_size", "32",
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4", "--workers", "0", "--stage1", "--lr 1e-3"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert rep["steps"] == rep["budget_steps"] == {"stage1_rcae": 3, "stage2_dpn": 2, "stage3_crd": 2, "fair": 1}
    assert torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["args"]["lr"] == 1e-3
    assert "stage1_rcae 3, stage2_dpn 2, stage3_crd 2, fair 1" in (tmp_path / "compare.md").read_text()
    assert compare.explicit_steps(str(tmp_path / "compare.json")) == rep["budget_steps"]  # reused from a run
    for bad in ("1,2,3", "a,b,c,d", "1,2,0,4"):
        try:
            compare.explicit_steps(bad)
            raise AssertionError(bad)
        except common.UserError as e:
            assert "four positive step counts" in str(e)


def test_compare_warns_when_timing_on_a_busy_machine(monkeypatch, capsys):
    monkeypatch.setattr(compare.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert compare.load_warning() == 9.0
    assert "load average 9.0 exceeds" in capsys.readouterr().err
    monkeypatch.setattr(compare.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    compare.load_warning()
    assert capsys.readouterr().err == ""


def test_ablations_smoke(toy_data, tmp_path):
    out = str(tmp_path)
    ablations.main(["--study", "stage1", "--data", toy_data, "--out", out, "--image_size", "32", "--steps", "2",
                    "--rows", "0,2", "--dark", "0.25"])
    rep = json.loads((tmp_path / "ablation_stage1.json").read_text())
    assert [(r["row"], r["data"].endswith("x0.25")) for r in rep["rows"]] == [
        ("paper (N=5, lr 1e-4)", False), ("lr 1e-3", False), ("paper (N=5, lr 1e-4)", True), ("lr 1e-3", True)]
    assert all("ratio_mean_5" in r["stage1_rcae"] for r in rep["rows"])
    ablations.main(["--study", "crd", "--data", toy_data, "--out", out, "--image_size", "32", "--steps", "2,2,3",
                    "--rows", "0,1", "--test", "1"])
    rep = json.loads((tmp_path / "ablation_crd.json").read_text())
    assert [r["stage3_crd_steps"] for r in rep["rows"]] == [3, 3]
    assert all({"p_auroc", "aupro"} <= set(r["stage3_crd"]) and "crd" in r["test"] for r in rep["rows"])
    md = (tmp_path / "ablation_crd.md").read_text()
    assert "| focal loss | toy |" in md
    again = ablations.main(["--study", "crd", "--data", toy_data, "--out", out, "--rows", "0,1", "--report", "1"])
    assert again is None and (tmp_path / "ablation_crd.md").read_text() == md  # nothing retrained, same table


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
