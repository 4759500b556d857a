"""The benchmark scripts run end to end (tiny sizes; their numbers are not checked here, only produced)."""
import json

import torch

import common
import synth
from benchmarks import ablations, compare, speed


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


def test_speed_optimisations_mode_times_each_choice_off_and_on(tmp_path, monkeypatch):
    """--optimisations 1: a row per speed choice of the code, each timed off and on; 'off' really runs without it:
    the concat materialised (speed.plain_cat) and the blocks' inputs in the plain layout."""
    seen, real_cat, real_plain = set(), common.conv_cat, speed.plain_cat

    def layout(p):  # the memory format the blocks hand their first conv
        cl = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
        return p.dim(), "channels_last" if p.is_contiguous(memory_format=cl) and not p.is_contiguous() else "plain"

    def spy_cat(conv, *parts):
        seen.add(layout(parts[0]))
        return real_cat(conv, *parts)

    def spy_plain(conv, *parts):
        seen.add("torch.cat")
        return real_plain(conv, *parts)

    monkeypatch.setattr(common, "conv_cat", spy_cat)
    monkeypatch.setattr(speed, "plain_cat", spy_plain)
    speed.main(["--optimisations", "1", "--sizes", "32", "--batch_size", "2", "--depth", "3", "--repeats", "1",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "optimisations_cpu.json").read_text())["rows"]
    names = [r["optimisation"] for r in rows]
    assert len(rows) == 14 and all(r["size"] == 32 for r in rows)
    assert all(r["before_images_per_s"] > 0 and r["after_images_per_s"] > 0 for r in rows)
    for choice in ("channels_last", "channels_last_3d", "concat inside the conv", "DPN per depth vs N depths",
                   "bf16 autocast on the CPU", "shared compression"):
        assert any(choice in n for n in names), choice
    assert not any("freed memory" in n for n in names)  # the allocator tuning is gone from the code
    assert "torch.cat" in seen  # the concat rows' 'before' replaced common.conv_cat inside the model code
    assert {(4, "channels_last"), (4, "plain"), (5, "channels_last"), (5, "plain")} <= seen  # both layouts timed
    assert (tmp_path / "optimisations_cpu.md").read_text().count("\n| ") == 1 + 14


def test_compare_smoke(toy_data, tmp_path):
    compare.main(["--data", toy_data, "--out", str(tmp_path), "--budget_min", "0.02", "--image_size", "32",
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert [r["variant"] for r in rep["rows"]] == ["crd", "rcae+dpn", "rcae", "fair"]
    assert set(rep["budget_steps"]) == {"stage1_rcae", "stage2_dpn", "stage3_crd", "fair"}
    assert rep["steps"] == rep["budget_steps"]  # every method trained exactly its share of the budget
    assert (tmp_path / "compare.md").read_text().count("\n| ") == 5


def test_compare_explicit_steps(toy_data, tmp_path, capsys):
    compare.main(["--data", toy_data, "--out", str(tmp_path), "--steps", "3,2,2,1", "--image_size", "32",
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4", "--recipe", "cpu",
                  "--stage1", "--lr 3e-4"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert rep["steps"] == rep["budget_steps"] == {"stage1_rcae": 3, "stage2_dpn": 2, "stage3_crd": 2, "fair": 1}
    ck = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True)["args"] for name in compare.NAMES}
    assert ck["stage1_rcae"]["lr"] == 3e-4 and ck["stage1_rcae"]["updown_init"] == "pca"  # --stage1 over the recipe
    assert ck["stage2_dpn"]["lr"] == 1e-3 and ck["stage3_crd"]["residual_scale"] == "position"  # the recipe, every stage
    assert ck["stage3_crd"]["image_size"] == ck["fair"]["image_size"] == 32  # one size for both methods
    assert "recipe" not in ck["fair"] and rep["recipe"] == "cpu"  # FAIR keeps its own settings
    assert all(r["peak_rss_mb"][0] > 0 for r in rep["rows"] if r["variant"] in ("crd", "fair"))  # position scale too
    assert "explicit steps" in (tmp_path / "compare.md").read_text()
    assert "stage1_rcae 3, stage2_dpn 2, stage3_crd 2, fair 1" in (tmp_path / "compare.md").read_text()
    assert compare.explicit_steps(str(tmp_path / "compare.json")) == rep["budget_steps"]  # reused from a run
    for bad in ("1,2,3", "a,b,c,d", "1,2,0,4"):
        try:
            compare.explicit_steps(bad)
            raise AssertionError(bad)
        except common.UserError as e:
            assert "four positive step counts" in str(e)


def test_compare_trains_the_readme_run_with_the_recipe_flags(monkeypatch):
    """`--recipe cpu --steps 1758,263,258,83` (the README's table) gives every stage exactly these flags: the old
    cpu2 run's, less the logging/worker flags and stages 2-3's --image_size (now inherited from stage 1)."""
    seen = {}
    for name, module in compare.STAGES + [("fair", compare.fair)]:
        monkeypatch.setattr(module, "main", lambda argv, name=name: seen.setdefault(name, argv))
    args = compare.get_args(["--data", "d", "--recipe", "cpu", "--steps", "1758,263,258,83"])
    compare.train_both(args, "o", torch.device("cpu"))
    shared = ["--data", "d", "--out", "o", "--batch_size", "8", "--device", "auto", "--seed", "0", "--epochs", "100000"]
    assert seen == {
        "stage1_rcae": shared + ["--image_size", "128", "--recipe", "cpu", "--depth", "5", "--max_steps", "1758"],
        "stage2_dpn": shared + ["--recipe", "cpu", "--max_steps", "263"],
        "stage3_crd": shared + ["--recipe", "cpu", "--max_steps", "258"],
        "fair": shared + ["--image_size", "128", "--base", "128", "--max_steps", "83"]}


def test_compare_warns_when_timing_on_a_busy_machine(monkeypatch, capsys):
    monkeypatch.setattr(compare.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert compare.load_warning() == 9.0
    assert "load average 9.0 exceeds" in capsys.readouterr().err
    monkeypatch.setattr(compare.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    compare.load_warning()
    assert capsys.readouterr().err == ""


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


def weights(root):
    """{checkpoint: fingerprint of its weights} under root (stage 3 re-saves its calibration on every call)."""
    return {p: common.fingerprint(torch.load(p, weights_only=True)["model"]) for p in root.rglob("*.pt")}


def test_ablation_table4_smoke_and_runs_shared_with_table2(tmp_path):
    """--table 4 trains each row's model from its flags (read back from the checkpoints), scores it with
    evaluate.py and writes the paper's layout with the paper's numbers; --table 2 then trains nothing new."""
    data = synth.make_synthetic_category(tmp_path / "toy", size=32, n_train=8, n_test_good=2, n_test_bad=2)
    out = tmp_path / "abl"
    ablations.main(["--table", "4", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out)])
    rep = json.loads((out / "ablation_table4.json").read_text())
    paper = json.loads(ablations.PAPER.read_text())["table4"]["rows"]
    mark = {True: "✓", False: "✗"}
    assert [r["labels"] for r in rep["rows"]] == [[p["model"], mark[p["skip"]], mark[p["shared"]]] for p in paper]
    assert [r["paper"] for r in rep["rows"]] == paper
    root = next((out / "tables").iterdir()) / "toy"
    for r in rep["rows"]:
        assert r["ours"]["toy"]["i_auroc"] is not None and r["variant"] == ("rcae" if r["labels"][0] == "ConvAE" else "crd")
        ck = torch.load(root / r["run"] / "stage1_rcae.pt", weights_only=True)
        cfg = ck["model_config"]
        assert ck["step"] == 3 and ck["args"]["recipe"] == "cpu"  # stage 1's own count, even in a ConvAE-only run
        assert (cfg["arch"], mark[bool(cfg["skip"])], mark[bool(cfg["share"])]) == (
            r["labels"][0].lower(), r["labels"][1], r["labels"][2])  # each row's own model, not the default one
        assert (root / r["run"] / "stage3_crd.pt").is_file() == (r["variant"] == "crd")
        if r["variant"] == "crd":
            assert torch.load(root / r["run"] / "stage3_crd.pt", weights_only=True)["step"] == 1
    md = (out / "ablation_table4.md").read_text()
    assert md.count("\n| ") == 1 + 5 and "| RcAE | ✓ | ✗ | crd |" in md and "| 71.3/74.2 | 73.5/75.0 |" in md
    trained = weights(root)
    ablations.main(["--table", "2", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out)])
    assert weights(root) == trained  # every Table 2 run was there: nothing trained again
    t2 = json.loads((out / "ablation_table2.json").read_text())["rows"]
    assert [r["variant"] for r in t2] == ["rcae", "rcae", "rcae+dpn", "crd"]
    assert [r["paper"]["i_auroc"] for r in t2] == [82.4, 94.1, 95.7, 98.9]
    # --report 1 tabulates what is trained and evaluated, and trains nothing: Table 5's 100% rows are these runs
    t5 = ablations.main(["--table", "5", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out),
                         "--report", "1"])
    assert weights(root) == trained and not any("train_fraction" in p.parent.name for p in root.rglob("*.pt"))
    assert [r["labels"][1] for r in t5["rows"] if r["ours"]] == ["100%", "100%"]
    assert [r["ours"] for r in t5["rows"] if r["ours"]] == [t2[0]["ours"], t2[3]["ours"]]


def test_ablation_table6_trains_only_crds_on_the_shared_chain(tmp_path):
    """Table 6's rows N_R = 1 and 3 train a CRD alone on the stages 1-2 of the full chain (its N_R = 5 row),
    reading those depths; evaluate.py scores them through the chain their CRD recorded."""
    data = synth.make_synthetic_category(tmp_path / "toy", size=32, n_train=8, n_test_good=2, n_test_bad=2)
    out = tmp_path / "abl"
    t6 = ablations.main(["--table", "6", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out)])
    root = next((out / "tables").iterdir()) / "toy"
    assert [r["run"] for r in t6["rows"]] == ["use_depths-5", "use_depths-1,3,5", "paper"]
    assert [r["paper"]["use_depths"] for r in t6["rows"]] == [[5], [1, 3, 5], [1, 2, 3, 4, 5]]
    chain = root / "paper"
    for r, depths in zip(t6["rows"], ([5], [1, 3, 5], [1, 2, 3, 4, 5])):
        ck = torch.load(root / r["run"] / "stage3_crd.pt", weights_only=True)
        assert ck["model_config"]["use_depths"] == depths and ck["step"] == 1
        assert ck["upstream"]["rcae"] == str((chain / "stage1_rcae.pt").resolve())  # the one shared chain
        assert r["ours"]["toy"]["i_auroc"] is not None
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("stage[12]_*.pt")) == [
        "paper/stage1_rcae.pt", "paper/stage2_dpn.pt"]  # stages 1-2 trained once
    md = (out / "ablation_table6.md").read_text()
    assert md.count("\n| ") == 1 + 3 and "| 3 | 1,3,5 | crd |" in md and "| 98.0/97.1 |" in md


def test_paper_tables_4_5_and_6_agree_with_table2():
    """Table 4's ConvAE without skip and Table 5's 100% column are Table 2's ConvAE; RcAE with skip and
    sharing, RcAE at 100% and N_R = N = 5 are the full method."""
    paper = json.loads(ablations.PAPER.read_text())
    t2, t4, t5, t6 = (paper[k]["rows"] for k in ("table2", "table4", "table5", "table6"))
    assert t4[1]["mvtec"] == t5[0]["results"][-1] == {k: t2[0][k] for k in ("i_auroc", "p_auroc")}
    assert t4[4]["mvtec"] == t5[1]["results"][-1] == {k: t2[3][k] for k in ("i_auroc", "p_auroc")}
    assert {k: t6[2][k] for k in ("i_auroc", "p_auroc")} == {k: t2[3][k] for k in ("i_auroc", "p_auroc")}
    assert paper["table5"]["train_fractions"] == [0.1, 0.25, 0.5, 0.75, 1.0]
    assert [r[0][1] for r in ablations.TABLES[5]["rows"]] == ["10%", "25%", "50%", "75%", "100%"] * 2
    assert [r[1].get("stage3_crd", ["", "1,2,3,4,5"])[1] for r in ablations.TABLES[6]["rows"]] == [
        ",".join(map(str, r["use_depths"])) for r in t6]
    full = {ablations.run_name(ablations.TABLES[k]["rows"][i][1]) for k, i in ((2, 3), (4, 4), (5, 9), (6, 2))}
    assert full == {"paper"}  # the full method's rows of every table are one trained run
