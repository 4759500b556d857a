"""The benchmark scripts run end to end (tiny sizes; their numbers are not checked here, only produced)."""
import json

from benchmarks import compare, optimisations, speed


def test_speed_report(tmp_path):
    argv = ["--repeats", "1", "--depth", "3", "--batch_size", "2", "--fair_sizes", "32", "--fair_batch", "1",
            "--fair_base", "8"]
    speed.main(argv + ["--sizes", "32", "--memory", "0", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "speed_cpu.json").read_text())
    items = {r["item"] for r in rep["rows"]}
    assert {"train stage1 RcAE", "train stage3 CRD", "infer RcAE+DPN+CRD", "infer FAIR"} <= items
    assert rep["matmul_peak_gflops"] > 0 and all(r["gflop_per_image"] > 0 for r in rep["rows"])
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
