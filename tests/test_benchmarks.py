"""The benchmark scripts run end to end (tiny sizes; their numbers are not checked here, only produced)."""
import json

import pytest
import torch

import common
import stage1_rcae
from benchmarks import ablations, border, compare, depth_probe, depth_residuals, optimisations, revalidate, speed


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
                  "--depth", "3", "--batch_size", "2", "--fair_base", "4", "--workers", "0", "--recipe", "cpu2",
                  "--stage1", "--lr 3e-4"])
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert rep["steps"] == rep["budget_steps"] == {"stage1_rcae": 3, "stage2_dpn": 2, "stage3_crd": 2, "fair": 1}
    ck = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True)["args"] for name in compare.NAMES}
    assert ck["stage1_rcae"]["lr"] == 3e-4 and ck["stage1_rcae"]["updown_init"] == "pca"  # --stage1 over the recipe
    assert ck["stage2_dpn"]["lr"] == 1e-3 and ck["stage3_crd"]["crd_norm"] == "position"  # the recipe in every stage
    assert "recipe" not in ck["fair"] and rep["recipe"] == "cpu2"  # FAIR keeps its own settings
    assert all(r["peak_rss_mb"][0] > 0 for r in rep["rows"] if r["variant"] in ("crd", "fair"))  # position norm too
    assert "explicit steps" in (tmp_path / "compare.md").read_text()
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


def test_depth_probe_trains_only_on_its_depth_and_reports_every_depth(toy_data, tmp_path, monkeypatch):
    """Step 0 measures the checkpoint as stage 1's own report did; then only the probed depth is trained."""
    import stage1_rcae
    from conftest import quick_args
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=3, lr=1e-3, holdout=0.25))
    ck = torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)
    seen, loss_fn = [], stage1_rcae.loss_fn
    monkeypatch.setattr(stage1_rcae, "loss_fn", lambda net, b: seen.append(int(b["n"])) or loss_fn(net, b))
    depth_probe.main(["--rcae", str(tmp_path / "stage1_rcae.pt"), "--depth", "2", "--steps", "3", "--every", "2"])
    assert seen == [2, 2, 2]
    rep = json.loads((tmp_path / "depth_probe_d2.json").read_text())
    assert [r["step"] for r in rep["rows"]] == [0, 2, 3] and set(rep["code_fit"]) == {"linear_1x1", "linear_3x3",
                                                                                      "pca_bound", "up_span"}
    assert rep["rows"][0]["l1_1"] == pytest.approx(ck["val"]["l1_1"], abs=1e-5)
    assert rep["rows"][-1]["l1_2"] != rep["rows"][0]["l1_2"]  # it trained
    assert torch.equal(torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["model"]["E.enc1.weight"],
                       ck["model"]["E.enc1.weight"])  # the checkpoint is left as it is
    with pytest.raises(common.UserError, match="--depth must be in 1..3"):
        depth_probe.main(["--rcae", str(tmp_path / "stage1_rcae.pt"), "--depth", "4"])


def test_depth_residuals_score_every_depth_as_evaluate_scores_the_deepest(toy_data, tmp_path):
    """Depth N's row is evaluate.py's "rcae" variant (the same map and P-AUROC), and with --dpn its "rcae+dpn"
    variant too; the other depths differ."""
    import evaluate
    import stage2_dpn
    from conftest import quick_args
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=3, lr=1e-3))
    stage2_dpn.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, max_steps=3, lr=1e-2))
    evaluate.main(["--data", toy_data, "--out", str(tmp_path), "--workers", "0", "--n_figures", "0"])
    variants = json.loads((tmp_path / "metrics.json").read_text())["variants"]
    depth_residuals.main(["--data", toy_data, "--rcae", str(tmp_path / "stage1_rcae.pt"), "--dpn",
                          str(tmp_path / "stage2_dpn.pt"), "--out", str(tmp_path / "dr.json")])
    rows = json.loads((tmp_path / "dr.json").read_text())[0]["rows"]
    assert [r["depth"] for r in rows] == [1, 2, 3]
    assert rows[-1]["p_auroc"] == pytest.approx(variants["rcae"]["p_auroc"], abs=1e-6)
    assert rows[-1]["p_auroc_dpn"] == pytest.approx(variants["rcae+dpn"]["p_auroc"], abs=1e-6)
    assert rows[-1]["p_auroc_dpn"] != pytest.approx(rows[-1]["p_auroc"], abs=1e-6)  # DPN changed the map
    assert len({round(r["p_auroc"], 6) for r in rows}) == 3 and all(r["residual_defect"] > 0 for r in rows)
    with pytest.raises(common.UserError, match="one stage-2 checkpoint per --rcae"):
        depth_residuals.get_args(["--data", toy_data, "--rcae", "a.pt", "b.pt", "--dpn", "c.pt"])


def test_revalidate_redraws_stage3s_validation(toy_data, tmp_path):
    """The run's own opacity gives back the validation stage 3 logged at its last step; the other opacity blends
    the same draws differently, so its scores differ. A run folder without a CRD is a one-line error."""
    import stage2_dpn
    import stage3_crd
    from conftest import quick_args
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=3, lr=1e-3))
    stage2_dpn.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, max_steps=3))
    with pytest.raises(common.UserError, match="no usable stage3_crd.pt"):
        revalidate.main(["--out", str(tmp_path)])
    stage3_crd.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, width=4, max_steps=4,
                               anomaly_size="relative", crd_input="both", anomaly_colour="image"))
    logged = [json.loads(line)["val"] for line in (tmp_path / "stage3_crd.log.jsonl").read_text().splitlines()
              if "val" in json.loads(line)][-1]
    revalidate.main(["--out", str(tmp_path), "--json", str(tmp_path / "rv.json")])
    rows = {r["opacity"]: r["val"] for r in json.loads((tmp_path / "rv.json").read_text())["rows"]}
    assert set(rows) == set(common.OPACITIES)
    for k in ("p_auroc", "aupro", "residual_p_auroc", "residual_aupro"):
        assert rows["strong"][k] == pytest.approx(logged[k], abs=1e-6)
    assert rows["draem"]["p_auroc"] != pytest.approx(rows["strong"]["p_auroc"], abs=1e-6)
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--anomaly_size", "relative", "scaled",
                     "--json", str(tmp_path / "rv.json")])
    rows = {r["anomaly_size"]: r["val"] for r in json.loads((tmp_path / "rv.json").read_text())["rows"]}
    assert rows["relative"]["p_auroc"] == pytest.approx(logged["p_auroc"], abs=1e-6)
    assert rows["scaled"]["anomalous_px"] < rows["relative"]["anomalous_px"]  # smaller pseudo anomalies
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--anomaly_kind", "all", "crack",
                     "--json", str(tmp_path / "rv.json")])
    rows = {r["anomaly_kind"]: r["val"] for r in json.loads((tmp_path / "rv.json").read_text())["rows"]}
    assert rows["all"]["p_auroc"] == pytest.approx(logged["p_auroc"], abs=1e-6)
    assert rows["crack"]["anomalous_px"] != pytest.approx(rows["all"]["anomalous_px"])  # cracks only: other masks
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--anomaly_place", "inside", "anywhere",
                     "--json", str(tmp_path / "rv.json")])
    rows = {r["anomaly_place"]: r["val"] for r in json.loads((tmp_path / "rv.json").read_text())["rows"]}
    assert rows["inside"]["p_auroc"] == pytest.approx(logged["p_auroc"], abs=1e-6)  # the run's own placement
    assert rows["anywhere"]["anomalous_px"] != pytest.approx(rows["inside"]["anomalous_px"])  # other blocks
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--anomaly_size", "scaled",
                     "--json", str(tmp_path / "rv.json")])
    scaled = json.loads((tmp_path / "rv.json").read_text())["rows"][0]
    ck = torch.load(tmp_path / "stage3_crd.pt", weights_only=True)  # a checkpoint from before the anomaly flags:
    ck["args"] = {k: v for k, v in ck["args"].items() if k not in ("anomaly_size", "opacity", "anomaly_place")}
    torch.save(ck, tmp_path / "stage3_crd.pt")  # read as what stage 3 drew then (common.BEFORE_FLAG)
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--json", str(tmp_path / "rv.json")])
    old = json.loads((tmp_path / "rv.json").read_text())["rows"][0]
    assert (old["trained_anomaly_size"], old["trained_opacity"], old["trained_anomaly_place"]) == \
        ("scaled", "strong", "inside")
    assert old["val"] == scaled["val"] and old["anomaly_colour"] == "image"  # the run's own colours
    del ck["args"]["anomaly_colour"]  # and from before --anomaly_colour: uniform colours, other draws
    torch.save(ck, tmp_path / "stage3_crd.pt")
    revalidate.main(["--out", str(tmp_path), "--opacity", "strong", "--json", str(tmp_path / "rv.json")])
    old = json.loads((tmp_path / "rv.json").read_text())["rows"][0]
    assert old["anomaly_colour"] == "uniform" and old["val"]["p_auroc"] != scaled["val"]["p_auroc"]


def test_revalidate_agreement_ranks_chains_like_the_test_split():
    """Spearman's rho per category and setting: +1 when the validation orders the runs as the test split does,
    -1 when it reverses them; a category with fewer than 3 runs gets none."""
    def row(out, data, val, test):
        return {"out": out, "data": data, "opacity": "strong", "anomaly_size": "relative", "anomaly_place": "inside",
                "anomaly_kind": "all", "anomaly_colour": "uniform", "val": {"p_auroc": val, "aupro": val},
                "test": {"crd": {"p_auroc": test, "aupro": 1 - test}}}
    rows = [row(f"r{i}", "bs", v, t) for i, (v, t) in enumerate([(0.9, 0.8), (0.7, 0.6), (0.5, 0.7)])]
    rows += [row("m0", "mt", 0.5, 0.5), row("m1", "mt", 0.6, 0.6)]
    agree = {a["data"]: a for a in revalidate.agreement(rows)}
    assert agree["bs"]["runs"] == 3 and agree["bs"]["spearman_p_auroc"] == pytest.approx(0.5)
    assert agree["bs"]["spearman_aupro"] == pytest.approx(-0.5)  # test AUPRO = 1 - test P-AUROC: reversed
    assert agree["mt"]["spearman_p_auroc"] is None

def test_code_fit_scores_what_the_code_holds():
    """A code of the blocks' top-C principal components reaches the PCA bound with a 1x1 affine decoder; a code
    that holds nothing is decoded as the mean block, far from it."""
    from types import SimpleNamespace
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(48, 3, 4, 4, generator=g), size=16, mode="bilinear")
    images = ((smooth + 0.1 * torch.rand(48, 3, 16, 16, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    train, holdout = images[:40], images[40:]
    blocks = F.unfold(common.to_float(train), 2, stride=2).transpose(1, 2).reshape(-1, 12)
    mean = blocks.mean(0)
    v = torch.linalg.svd(blocks - mean, full_matrices=False).Vh[:3]

    def pca_code(x, n):  # (M, 3, 16, 16) -> [(M, 3, 8, 8)]: each block's top-3 coefficients
        b = F.unfold(x, 2, stride=2).transpose(1, 2) - mean  # (M, 64, 12)
        return [(b @ v.T).transpose(1, 2).reshape(len(x), 3, 8, 8)]

    model = SimpleNamespace(cfg=SimpleNamespace(channels=3), compress=pca_code)
    fit = depth_probe.code_fit(model, train, holdout, 1)
    assert fit["linear_1x1"] == pytest.approx(fit["pca_bound"], rel=1e-3)
    assert fit["linear_3x3"] <= fit["linear_1x1"] + 1e-3
    model.compress = lambda x, n: [torch.zeros(len(x), 3, 8, 8)]
    empty = depth_probe.code_fit(model, train, holdout, 1)
    assert empty["linear_1x1"] > 2 * fit["pca_bound"] and empty["pca_bound"] == fit["pca_bound"]


def test_up_span_is_what_the_last_layer_can_output():
    """With the last deconv spanning the blocks' top-C principal components, up_span is the PCA bound; with a
    deconv that outputs one fixed block it is the mean block's error; a real depth-1 output never beats it."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(48, 3, 4, 4, generator=g), size=16, mode="bilinear")
    scale, shift = torch.tensor([1.0, 0.3, 0.6]).view(1, 3, 1, 1), torch.tensor([0.0, 0.5, 0.2]).view(1, 3, 1, 1)
    noisy = (smooth + 0.1 * torch.rand(48, 3, 16, 16, generator=g)) * scale + shift  # unequal channel stats
    images = (noisy.clamp(0, 1) * 255).to(torch.uint8)
    blocks = F.unfold(common.to_float(images), 2, stride=2).transpose(1, 2).reshape(-1, 12)
    mean = blocks.mean(0)
    v = torch.linalg.svd(blocks - mean, full_matrices=False).Vh[:3]
    model = stage1_rcae.RcAE(stage1_rcae.Config(image_size=16, depth=1, input_norm=1))
    model.fit_input_norm(images)  # the span is read through the output's un-standardisation
    with torch.no_grad():
        model.up.weight.copy_(v.view(3, 3, 2, 2) / model.in_std.view(1, 3, 1, 1))
        model.up.bias.copy_((mean.view(3, 4).mean(1) - model.in_mean.view(3)) / model.in_std.view(3))
    bound = depth_probe.code_fit(model, images, images, 1)["pca_bound"]
    assert depth_probe.up_span(model, images, 1) == pytest.approx(bound, rel=0.01)
    recon = model(common.to_float(images), 1).detach()  # this D's depth 1: in the same span, so no better
    ratio = (recon - common.to_float(images)).abs().mean() / (stage1_rcae.blur(common.to_float(images), 1)
                                                              - common.to_float(images)).abs().mean()
    assert ratio > depth_probe.up_span(model, images, 1)
    with torch.no_grad():
        model.up.weight.zero_()
    assert depth_probe.up_span(model, images, 1) > 3 * bound


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


def test_ablation_table4_smoke_and_runs_shared_with_table2(tmp_path):
    """--table 4 trains each row's model from its flags (read back from the checkpoints), scores it with
    evaluate.py and writes the paper's layout with the paper's numbers; --table 2 then trains nothing new."""
    data = common.make_synthetic_category(tmp_path / "toy", size=32, n_train=8, n_test_good=2, n_test_bad=2)
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
    def weights():  # stage 3 re-saves its calibration on every call; the weights must stay
        return {p: common.fingerprint(torch.load(p, weights_only=True)["model"]) for p in root.rglob("*.pt")}

    trained = weights()
    ablations.main(["--table", "2", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out)])
    assert weights() == trained  # every Table 2 run was there: nothing trained again
    t2 = json.loads((out / "ablation_table2.json").read_text())["rows"]
    assert [r["variant"] for r in t2] == ["rcae", "rcae", "rcae+dpn", "crd"]
    assert [r["paper"]["i_auroc"] for r in t2] == [82.4, 94.1, 95.7, 98.9]
    # --report 1 tabulates what is trained and evaluated, and trains nothing: Table 5's 100% rows are these runs
    t5 = ablations.main(["--table", "5", "--data", data, "--image_size", "32", "--steps", "3,2,1", "--out", str(out),
                         "--report", "1"])
    assert weights() == trained and not any("train_fraction" in p.parent.name for p in root.rglob("*.pt"))
    assert [r["labels"][1] for r in t5["rows"] if r["ours"]] == ["100%", "100%"]
    assert [r["ours"] for r in t5["rows"] if r["ours"]] == [t2[0]["ours"], t2[3]["ours"]]


def test_paper_tables_4_and_5_agree_with_table2():
    """Table 4's ConvAE without skip and Table 5's 100% column are Table 2's ConvAE; RcAE with skip and
    sharing, and RcAE at 100%, are the full method."""
    paper = json.loads(ablations.PAPER.read_text())
    t2, t4, t5 = (paper[k]["rows"] for k in ("table2", "table4", "table5"))
    assert t4[1]["mvtec"] == t5[0]["results"][-1] == {k: t2[0][k] for k in ("i_auroc", "p_auroc")}
    assert t4[4]["mvtec"] == t5[1]["results"][-1] == {k: t2[3][k] for k in ("i_auroc", "p_auroc")}
    assert paper["table5"]["train_fractions"] == [0.1, 0.25, 0.5, 0.75, 1.0]
    rows5 = ablations.STUDIES["table5"]["rows"]
    assert [r[0][1] for r in rows5] == ["10%", "25%", "50%", "75%", "100%"] * 2


def test_border_scores_the_band_apart():
    """A map that finds every defect inside the image and none at its border: AUROC 1 inside, 0 at the border;
    a normal map lower at the border reads below 1."""
    import numpy as np
    band = border.band_of(16, 2)
    assert band.mean() == pytest.approx(1 - (12 / 16) ** 2)
    masks = np.zeros((3, 16, 16), bool)
    masks[1, 0:2, 0:6] = True  # at the border: its 12 px all in the band
    masks[2, 6:10, 6:10] = True  # inside
    maps = np.full((3, 16, 16), 0.5)
    maps[0, band] = 0.2  # the normal image: lower at the border
    maps[1][masks[1]] = 0.0  # the border defect scored below every normal pixel
    maps[2][masks[2]] = 1.0
    r = border.border_scores(masks, maps, np.array([True, False, False]), band)
    assert r["p_auroc_inside"] == 1.0 and r["p_auroc_border"] == 0.0
    assert r["normal_border_over_inside"] == pytest.approx(0.4)
    assert border.border_share(masks, band) == pytest.approx(12 / 28)


def test_border_report(toy_data, tmp_path):
    """Without run folders: where the test masks and both placements of pseudo anomalies put anomalous pixels."""
    border.main(["--data", toy_data, "--image_size", "64", "--json", str(tmp_path / "b.json")])
    r = json.loads((tmp_path / "b.json").read_text())
    assert 0 <= r["test_share"] <= 1 and r["runs"] == []
    assert r["pseudo_share"]["anywhere"] > r["pseudo_share"]["inside"]
    assert r["normal_grad_border_over_inside"] > 0
