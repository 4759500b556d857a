"""metrics.py against sklearn and a brute-force AUPRO, then the harness evaluate.py end to end."""
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

import evaluate
import metrics

# ----------------------------------------------------------------------------- metrics


def aupro_brute(masks, maps, limit=0.3):
    """The definition, literally: one threshold per distinct score, a Python loop over them."""
    masks = masks > 0
    regions = []
    for m, s in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [s[lab == r] for r in range(1, n + 1)]
    normal = maps[~masks]
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pts.append((np.mean(normal >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(pts[:-1], pts[1:]):
        if f0 >= limit:
            break
        if f1 > limit:
            p1 = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
            f1 = limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / limit


def random_case(seed, n=3, size=12, levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):  # several regions per image
            y, x, h, w = rng.integers(0, size - 3, 2).tolist() + rng.integers(1, 4, 2).tolist()
            masks[i, y:y + h, x:x + w] = 255
    maps = rng.random((n, size, size)) + 0.7 * (masks > 0)
    if levels:  # quantise: many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 5), (3, 3), (4, 20), (5, 1)])
def test_aupro_matches_brute_force(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    got, want = metrics.aupro(masks, maps), aupro_brute(masks, maps)
    assert 0 <= got <= 1
    assert got == pytest.approx(want, abs=1e-9)


def test_aupro_diagonal_pixels_are_one_region():
    # region A: two diagonal pixels (one 8-connected region); region B: one pixel elsewhere
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 4, 4] = 1
    maps = np.zeros((1, 6, 6), np.float32)
    maps[0, 1, 1] = 1.0  # half of region A found, region B missed, no false positive
    # 8-connected: regions A, B; PRO 0.25 at FPR 0, then a straight segment to (1, 1), which is at
    # 0.475 at FPR 0.3: area 0.3 * (0.25 + 0.475) / 2, normalised 0.3625. 4-connectivity would see
    # three regions (PRO 1/3 at FPR 0) and give 0.4333.
    assert metrics.aupro(masks, maps) == pytest.approx(aupro_brute(masks, maps))
    assert metrics.aupro(masks, maps) == pytest.approx(0.3625, abs=1e-9)


def test_aupro_analytic_cases():
    masks, maps = random_case(7)
    perfect = (masks > 0).astype(np.float32)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    # all scores equal: one threshold, the curve jumps from (0, 0) to (1, 1); the line PRO = FPR has
    # area 0.3^2 / 2 = 0.045 below 0.3, normalised 0.045 / 0.3 = 0.15
    assert metrics.aupro(masks, np.full(maps.shape, 0.3, np.float32)) == pytest.approx(0.15)
    assert metrics.aupro(masks, 1 - perfect) == pytest.approx(0.0, abs=1e-9)
    assert metrics.aupro(masks, -maps) < 0.05  # inverted scores
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(aupro_brute(masks, maps, 1.0))


def test_aupro_never_above_one_and_regions_of_any_size():
    rng = np.random.default_rng(8)
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[0, 2:30, 2:30] = 1  # a big region and a 1-pixel region: the small one counts as much
    masks[1, 35, 35] = 1
    maps = rng.random((2, 40, 40)) + 2.0 * masks
    maps[1, 35, 35] = 0.0  # the 1-pixel region is missed completely until FPR 1
    v = metrics.aupro(masks, maps)
    assert v == pytest.approx(aupro_brute(masks, maps))
    assert 0.49 < v <= 0.5 + 1e-9


def test_metrics_one_class_is_nan_not_a_crash():
    maps = np.random.default_rng(0).random((3, 8, 8))
    zeros = np.zeros((3, 8, 8))
    assert math.isnan(metrics.aupro(zeros, maps))
    assert math.isnan(metrics.aupro(np.ones((3, 8, 8)), maps))  # no normal pixel
    assert math.isnan(metrics.pixel_auroc(zeros, maps))
    assert math.isnan(metrics.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in metrics.best_f1([1, 1], [0.1, 0.2]))


def test_aurocs_match_sklearn():
    rng = np.random.default_rng(3)
    masks = (rng.random((4, 16, 16)) > 0.8).astype(np.uint8) * 255  # 255 like mask files: binarised
    maps = rng.random((4, 16, 16)) + 0.3 * (masks > 0)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score((masks > 0).ravel(), maps.ravel()), abs=1e-6)
    labels, scores = rng.integers(0, 2, 50), rng.random(50)
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.image_auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert metrics.image_auroc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0


def test_best_f1():
    f1, t = metrics.best_f1([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert (f1, t) == (1.0, 0.7)
    f1, t = metrics.best_f1([0, 1, 0, 1], [0.1, 0.2, 0.7, 0.9])  # best: all >= 0.2, F1 0.8
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.7, 0.9])
    brute = max((2 * ((scores >= u) & (labels == 1)).sum() / ((scores >= u).sum() + labels.sum()), u) for u in scores)
    assert (f1, t) == pytest.approx(brute) == (0.8, 0.2)


def test_per_defect_scores_each_kind_against_the_normal_images():
    """Kind a is found perfectly, kind b upside down: each kind's metrics see only it and the normal images.
    One b image has no mask: it counts for the images, not for the pixels. The kinds are interleaved."""
    defects = np.array(["good", "a", "b", "good", "b", "a", "good", "b", "good"])
    labels = (defects != "good").astype(int)
    pix = np.array([0, 1, 3, 4, 5, 6, 7, 8])  # image 2 (a b) has no pixel ground truth
    rng = np.random.default_rng(0)
    masks = np.zeros((8, 8, 8), bool)  # masks and maps hold the images pix
    masks[labels[pix] == 1, 2:5, 2:5] = True
    maps = rng.uniform(0.4, 0.6, (8, 8, 8))
    a, b = defects[pix] == "a", defects[pix] == "b"
    maps[a] = np.where(masks[a], 0.9, 0.1)  # a: its region above every normal pixel
    maps[b] = np.where(masks[b], 0.0, 0.5)  # b: its region below every pixel
    scores = np.select([defects == "a", defects == "b"], [0.9, 0.1], 0.5)
    r = evaluate.per_defect(defects, labels, pix, masks, maps, scores)
    assert sorted(r) == ["a", "b"] and (r["a"]["n_images"], r["b"]["n_images"]) == (2, 3)
    assert r["a"]["i_auroc"] == r["a"]["p_auroc"] == r["a"]["aupro"] == 1.0
    assert r["b"]["i_auroc"] == r["b"]["p_auroc"] == r["b"]["aupro"] == 0.0
    whole = evaluate.metrics_of(labels, masks, maps, scores)  # both kinds pooled: in between
    assert 0 < whole["p_auroc"] < 1 and 0 < whole["i_auroc"] < 1
    as_lists = evaluate.per_defect(defects, labels, pix, list(masks), list(maps), scores)  # images of several sizes
    assert as_lists == r
    one = defects != "b"
    assert evaluate.per_defect(defects[one], labels[one], np.arange(one.sum()), masks[one[pix]], maps[one[pix]],
                               scores[one]) == {}  # one kind: the whole split says it


def test_gaussian_blur_matches_scipy():
    import torch
    m = np.random.default_rng(0).random((2, 1, 40, 40)).astype(np.float32)
    got = evaluate.gaussian_blur(torch.from_numpy(m), 4.0).numpy()
    want = ndimage.gaussian_filter(m, sigma=(0, 0, 4, 4), mode="mirror", truncate=4.0)
    assert np.abs(got - want).max() < 1e-5
    assert np.array_equal(evaluate.gaussian_blur(torch.from_numpy(m), 0).numpy(), m)  # sigma 0: off


# ----------------------------------------------------------------------------- harness

import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

import common  # noqa: E402
import stage1_rcae  # noqa: E402
import synth  # noqa: E402
from conftest import quick_args  # noqa: E402

FAST = ["--device", "cpu", "--n_figures", "1"]


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """Stage 1 trained for 2 steps on the toy category: its --out folder."""
    out = tmp_path_factory.mktemp("run")
    stage1_rcae.main(quick_args(toy_data, out))
    return out


def check_variant(v, n, n_anom):
    assert v["n_images"] == n and v["n_anomalous"] == n_anom and v["images_per_s"] > 0 and v["params"] > 0
    for k in ("i_auroc", "p_auroc", "aupro", "best_f1"):
        assert v[k] is None or 0 <= v[k] <= 1, (k, v[k])


def test_stage1_metrics_json(toy_data, trained):
    evaluate.main(["--data", toy_data, "--out", str(trained), *FAST])
    m = json.loads((trained / "metrics.json").read_text())
    assert m["schema"] == 1 and m["image_size"] == 64 and m["depth"] == 3 and m["category"] == "toy"
    assert (m["n_images"], m["n_anomalous"]) == (12, 6)
    assert list(m["variants"]) == ["rcae"] and m["calibrated_threshold"] is None
    assert m["params"]["stage1_rcae"] == m["variants"]["rcae"]["params"] > 0
    check_variant(m["variants"]["rcae"], 12, 6)
    assert all(m["variants"]["rcae"][k] is not None for k in ("i_auroc", "p_auroc", "aupro"))
    s = json.loads((trained / "scores.json").read_text())  # the scores behind I-AUROC, recomputed
    assert m["variants"]["rcae"]["i_auroc"] == pytest.approx(roc_auc_score(s["labels"], s["scores"]["rcae"]))
    assert (trained / "figures" / "roc.png").is_file()
    assert len(list((trained / "figures").glob("rcae_*.png"))) == 2  # one normal, one anomalous


def test_per_defect_kinds_in_metrics_json(toy_data, trained, tmp_path, capsys):
    """A category with two defect folders: metrics.json and the printed table break the metrics down by kind."""
    data = tmp_path / "toy"
    shutil.copytree(toy_data, data)
    for sub in ("test", "ground_truth"):  # half of test/defect (and its masks) becomes test/dent
        moved = sorted((data / sub / "defect").iterdir())[:3]
        (data / sub / "dent").mkdir()
        for f in moved:
            f.rename(data / sub / "dent" / f.name)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "stage1_rcae.pt", out)
    evaluate.main(["--data", str(data), "--out", str(out), *FAST])
    per = json.loads((out / "metrics.json").read_text())["variants"]["rcae"]["per_defect"]
    assert sorted(per) == ["defect", "dent"] and per["dent"]["n_images"] == per["defect"]["n_images"] == 3
    assert all(0 <= per[k][m] <= 1 for k in per for m in ("i_auroc", "p_auroc", "aupro"))
    assert "dent (3)" in capsys.readouterr().out


def test_missing_checkpoint_names_the_stage_command(toy_data, tmp_path):
    with pytest.raises(common.UserError, match=r"python stage1_rcae\.py --data"):
        evaluate.main(["--data", toy_data, "--out", str(tmp_path), *FAST])


def test_only_normal_test_split_reports_null(toy_data, trained, tmp_path):
    data = tmp_path / "normals"
    shutil.copytree(toy_data, data, ignore=shutil.ignore_patterns("defect"))  # test/defect, ground_truth/defect
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "stage1_rcae.pt", out)
    evaluate.main(["--data", str(data), "--out", str(out), *FAST])
    m = json.loads((out / "metrics.json").read_text())
    v = m["variants"]["rcae"]
    assert m["n_anomalous"] == 0 and m["n_images"] == 6
    assert all(v[k] is None for k in ("i_auroc", "p_auroc", "aupro", "best_f1", "best_f1_threshold"))
    check_variant(v, 6, 0)


def test_folder_of_categories_writes_results_table(toy_data, trained, tmp_path):
    root = tmp_path / "mvtec"
    for cat in ("alpha", "beta"):
        shutil.copytree(toy_data, root / cat)
    results = tmp_path / "results"
    (results / "alpha").mkdir(parents=True)
    shutil.copy(trained / "stage1_rcae.pt", results / "alpha")  # beta has no checkpoint: skipped
    evaluate.main(["--data", str(root), "--out", str(results), *FAST])
    md = (results / "results.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("| ")]
    assert rows[0].split("|")[2].strip() == "rcae" and rows[1].startswith("| alpha |") and "Mean" in rows[2]
    assert "beta" in md.split("Skipped")[1]
    with open(results / "results.csv") as f:
        import csv
        table = list(csv.reader(f))
    assert table[0] == ["category", "rcae I-AUROC", "rcae P-AUROC", "rcae AUPRO"]
    assert [r[0] for r in table[1:]] == ["alpha", "Mean"]
    alpha = json.loads((results / "alpha" / "metrics.json").read_text())["variants"]["rcae"]
    assert float(table[2][1]) == pytest.approx(alpha["i_auroc"], abs=1e-4)  # one category: Mean = its value


def test_full_chain_three_variants_and_predict(toy_data, trained, tmp_path):
    import stage2_dpn
    import stage3_crd
    out = tmp_path / "chain"
    out.mkdir()
    shutil.copy(trained / "stage1_rcae.pt", out)
    stage2_dpn.main(quick_args(toy_data, out, image_size=None, depth=None))
    stage3_crd.main(quick_args(toy_data, out, image_size=None, depth=None))
    evaluate.main(["--data", toy_data, "--out", str(out), *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["variants"]) == ["rcae", "rcae+dpn", "crd"]
    for v in m["variants"].values():
        check_variant(v, 12, 6)
    # every variant gets the same post-processing, and metrics.json says which
    assert m["post_processing"] == {"gaussian_sigma": 4.0, "applied_to": "every variant's map"}
    st = stage3_crd.load_chain(out)
    x = common.to_float(evaluate.load_test(toy_data, 64).images[:2])
    det = stage3_crd.detector_of(st)
    for sigma in (0.0, 4.0):
        crd_map = evaluate.variant_fns(st, sigma, 0.01)["crd"](x)[0]
        assert torch.allclose(crd_map, evaluate.gaussian_blur(det(x)["map"], sigma), atol=1e-6)
    p = m["params"]
    assert m["variants"]["crd"]["params"] == p["stage1_rcae"] + p["stage2_dpn"] + p["stage3_crd"]
    cal = m["calibrated_threshold"]
    assert cal["variant"] == "crd" and 0 <= cal["tpr"] <= 1 and 0 <= cal["fpr"] <= 1
    # FAIR after RcAE: merged into the same metrics.json, the RcAE variants and threshold kept
    from baselines import fair
    fair.main(quick_args(toy_data, out, depth=None, base=8))
    evaluate.main(["--data", toy_data, "--out", str(out), "--method", "fair", *FAST])
    m2 = json.loads((out / "metrics.json").read_text())
    assert list(m2["variants"]) == ["rcae", "rcae+dpn", "crd", "fair"]
    assert m2["variants"]["crd"] == m["variants"]["crd"] and m2["calibrated_threshold"] == cal
    check_variant(m2["variants"]["fair"], 12, 6)
    assert m2["params"]["fair"] == m2["variants"]["fair"]["params"] and m2["depth"] == 3
    assert list(json.loads((out / "scores.json").read_text())["scores"]) == list(m2["variants"])
    # predict: a folder and a file, in another image mode and size; decisions follow each variant's threshold
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.open(next(Path(toy_data, "test", "defect").glob("*.png"))).convert("L").resize((90, 60)).save(imgs / "gray.jpg")
    good = str(next(Path(toy_data, "test", "good").glob("*.png")))
    folders = []
    for variant in ("crd", "rcae", "rcae+dpn"):
        rows = evaluate.main(["--predict", str(imgs), good, "--out", str(out), "--device", "cpu", "--variant", variant])
        folders.append(Path(rows[0][-1]).parent)
        assert len(rows) == 2 and folders[-1].parent == out / "predictions" and variant in folders[-1].name
        with open(folders[-1] / "predictions.csv") as f:
            table = list(csv.DictReader(f))
        assert [Path(r["overlay"]).name for r in table] == ["gray.png", Path(good).name]
        assert (table[0]["width"], table[0]["height"]) == ("90", "60")
        assert {r["variant"] for r in table} == {variant} and len({r["threshold"] for r in table}) == 1
        for r in table:
            assert r["decision"] == ("anomalous" if float(r["score"]) > float(r["threshold"]) else "normal")
            assert Path(r["overlay"]).is_file()
        if variant == "crd":
            assert float(table[0]["threshold"]) == cal["image_threshold"]
        with Image.open(table[0]["overlay"]) as im:  # the 90x60 image at least at its own size, plus a colour bar
            assert im.width > 90 and im.height > 60
    assert len(set(folders)) == 3  # one folder per call: nothing overwritten or mixed
    # bad input: one error each, no new folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for bad, msg in ((tmp_path / "nope.png", "no such file"), (tmp_path / "empty", "no images"),
                     (tmp_path / "notes.txt", "not an image file"), (tmp_path / "broken.png", "not a readable image")):
        with pytest.raises(common.UserError, match=msg):
            evaluate.main(["--predict", str(bad), "--out", str(out), "--device", "cpu"])
    assert len(list((out / "predictions").iterdir())) == 3


def test_predict_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(Path(evaluate.__file__)), "--predict", str(tmp_path / "nope.png"),
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: --predict {tmp_path / 'nope.png'}: "
                                                                   f"no such file or folder"]
    assert list(tmp_path.iterdir()) == []


def test_masks_resized_nearest_to_the_maps_with_one_note(capsys):
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4, :4] = True
    note = []
    small = evaluate.match_masks(masks, (4, 4), note)
    assert small.shape == (2, 4, 4) and small[0, :2, :2].all() and small.sum() == 4
    evaluate.match_masks(masks, (4, 4), note)
    assert capsys.readouterr().out.count("note: masks") == 1
    assert evaluate.match_masks(masks, (8, 8), note) is masks


# ----------------------------------------------------------------------------- masks optional, layouts, aspect ratio


def image_level_copy(toy_data, dest, keep_masks=0):
    """A copy of the toy category whose anomalous images keep only their first `keep_masks` masks."""
    shutil.copytree(toy_data, dest)
    for m in sorted((dest / "ground_truth" / "defect").glob("*.png"))[keep_masks:]:
        m.unlink()
    return dest


@pytest.mark.parametrize("keep", [0, 2])
def test_image_level_only_dataset(toy_data, trained, tmp_path, capsys, keep):
    data = image_level_copy(toy_data, tmp_path / "il", keep_masks=keep)
    evaluate.main(["--data", str(data), "--out", str(trained), *FAST])
    m = json.loads((trained / "metrics.json").read_text())
    v = m["variants"]["rcae"]
    assert (m["n_images"], m["n_anomalous"], m["n_pixel_images"], m["n_pixel_anomalous"]) == (12, 6, 6 + keep, keep)
    assert v["i_auroc"] is not None and v["best_f1"] is not None
    if keep:
        assert v["p_auroc"] is not None and v["aupro"] is not None
    else:
        assert v["p_auroc"] is None and v["aupro"] is None
    cap = capsys.readouterr()
    assert "have no mask" in cap.err or "has a mask" in cap.err
    assert f"over the {6 + keep} of 12 images with pixel ground truth" in cap.out


def test_folder_of_image_level_categories(toy_data, trained, tmp_path):
    root = tmp_path / "cats"
    image_level_copy(toy_data, root / "alpha")
    image_level_copy(toy_data, root / "beta", keep_masks=3)
    results = tmp_path / "results"
    for cat in ("alpha", "beta"):
        (results / cat).mkdir(parents=True)
        shutil.copy(trained / "stage1_rcae.pt", results / cat)
    evaluate.main(["--data", str(root), "--out", str(results), *FAST])
    md = (results / "results.md").read_text()
    assert "- alpha: 6 of 12 images (0 of 6 anomalous images have a mask)" in md
    assert "- beta: 9 of 12 images (3 of 6 anomalous images have a mask)" in md


def test_only_anomalous_test_split_reports_null_with_a_warning(toy_data, trained, tmp_path, capsys):
    data = tmp_path / "bad_only"
    shutil.copytree(toy_data, data)
    shutil.rmtree(data / "test" / "good")
    evaluate.main(["--data", str(data), "--out", str(trained), *FAST])
    v = json.loads((trained / "metrics.json").read_text())["variants"]["rcae"]
    assert all(v[k] is None for k in ("i_auroc", "best_f1"))
    assert "only anomalous images" in capsys.readouterr().err


def test_empty_test_split_is_an_error_and_writes_nothing(toy_data, trained, tmp_path):
    data = tmp_path / "empty"
    shutil.copytree(toy_data, data)
    for d in ("good", "defect"):
        shutil.rmtree(data / "test" / d)
    shutil.rmtree(data / "ground_truth")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "stage1_rcae.pt", out)
    with pytest.raises(common.UserError, match="no test images"):
        evaluate.main(["--data", str(data), "--out", str(out), *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["stage1_rcae.pt"]


def test_mask_without_image_is_an_error(toy_data, trained, tmp_path):
    data = tmp_path / "orphan"
    shutil.copytree(toy_data, data)
    next((data / "test" / "defect").glob("*.png")).unlink()
    with pytest.raises(common.UserError, match="has no image"):
        evaluate.main(["--data", str(data), "--out", str(trained), *FAST])


@pytest.mark.parametrize("layout", ["mvtec_ad2", "btad", "folder"])
def test_other_layouts_evaluate(trained, tmp_path, layout):
    data = synth.make_synthetic_category(tmp_path / layout, size=64, n_train=4, n_test_good=3, n_test_bad=3,
                                         layout=layout)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "stage1_rcae.pt", out)
    evaluate.main(["--data", data, "--out", str(out), *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_anomalous"] == 3 and m["n_pixel_anomalous"] == 3
    assert m["variants"]["rcae"]["p_auroc"] is not None


@pytest.mark.parametrize("resize", ["pad", "crop"])
def test_non_square_images_keep_their_aspect_ratio(tmp_path, resize):
    from PIL import Image
    data = Path(synth.make_synthetic_category(tmp_path / "wide", size=64, n_train=8, n_test_good=3, n_test_bad=3))
    for p in data.rglob("*.png"):  # 64 x 96: wider than high, masks alike
        im = Image.open(p)
        im.resize((96, 64), Image.NEAREST if "ground_truth" in str(p) else Image.BILINEAR).save(p)
    out = tmp_path / "out"
    stage1_rcae.main(quick_args(str(data), out, resize=resize))
    evaluate.main(["--data", str(data), "--out", str(out), *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert m["resize"] == resize and m["variants"]["rcae"]["p_auroc"] is not None
    # the maps are compared with the masks on the image's own 2:3 grid
    split = evaluate.load_test(str(data), 64, resize)
    gt, maps = evaluate.on_frames(split, 64, np.zeros((len(split), 64, 64), np.float32), np.arange(len(split)))
    assert gt.shape[1:] == maps.shape[1:] == (43, 64)
