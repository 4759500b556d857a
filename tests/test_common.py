"""common.py: loaders (every layout, image modes, aspect ratio), bad input, pseudo anomalies, the image gradient,
checkpoints, the training loop; synth.py's generator."""
import csv
import shutil
from argparse import Namespace
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import stage1_rcae
import stage2_dpn
import stage3_crd
import synth
from common import UserError
from conftest import quick_args


def make_mvtec(root, n_train=3, size=32, mode="RGB"):
    """A minimal MVTec-layout folder with images of a given PIL mode."""
    rng = np.random.default_rng(0)
    for folder, n in [("train/good", n_train), ("test/good", 2), ("test/crack", 2)]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).convert(mode).save(root / folder / f"{i:03d}.png")
    (root / "ground_truth/crack").mkdir(parents=True)
    for i in range(2):
        m = np.zeros((size, size), np.uint8)
        m[4:10, 4:10] = 255
        Image.fromarray(m).save(root / "ground_truth/crack" / f"{i:03d}_mask.png")
    return root


# ----------------------------------------------------------------------------- loading


def test_mvtec_layout(toy_data):
    train = common.load_train(toy_data, 32)
    test = evaluate.load_test(toy_data, 32)
    assert train.shape == (24, 3, 32, 32) and train.dtype == torch.uint8
    assert len(test) == 12 and test.labels.sum() == 6
    assert test.masks.shape == (12, 1, 32, 32) and test.masks.dtype == torch.bool
    assert not test.masks[test.labels == 0].any() and test.masks[test.labels == 1].any()


def test_visa_layout(toy_visa):
    assert common.detect_layout(toy_visa) == "visa"
    train = common.load_train(toy_visa, 32)
    test = evaluate.load_test(toy_visa, 32)
    assert len(train) == 12 and len(test) == 8 and test.labels.tolist().count(1) == 4
    assert test.masks[test.labels == 1].any()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / "x.png"
    a = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    if mode == "I;16":
        Image.fromarray((a * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").convert(mode).save(path)
    img = common.read_image(path, 8)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() < 60  # the full range survives, 16-bit included


def test_grayscale_and_rgba_categories_load(tmp_path):
    for mode in ("L", "RGBA"):
        images = common.load_train(str(make_mvtec(tmp_path / mode, mode=mode)), 16)
        assert images.shape == (3, 3, 16, 16)


def test_masks_binarised(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 1  # VisA masks use small label values
    Image.fromarray(m).save(tmp_path / "m.png")
    assert evaluate.read_mask(tmp_path / "m.png", 8).sum() == 4


@pytest.mark.parametrize("layout", ["mvtec", "mpdd", "mvtec_ad2", "btad", "folder", "visa"])
def test_every_layout_is_detected_and_read(tmp_path, layout):
    data = synth.make_synthetic_category(tmp_path / layout, size=16, n_train=5, n_test_good=2, n_test_bad=2,
                                         layout=layout)
    assert common.detect_layout(data) == {"mpdd": "mvtec"}.get(layout, layout)
    train, test = common.list_samples(data, "train"), common.list_samples(data, "test")
    n_good = 1 if layout == "folder" else 2  # a plain folder's good/ (7 images) gives 20% to the test split
    assert len(train) == 7 - n_good if layout == "folder" else len(train) == 5
    assert sorted(s.label for s in test) == [0] * n_good + [1, 1]
    assert all((s.mask is not None) == bool(s.label) for s in test)
    assert not {s.path for s in train} & {s.path for s in test}
    split = evaluate.load_test(data, 16)
    assert split.masks[split.labels == 1].any() and not split.masks[split.labels == 0].any()


def test_layout_mask_without_image(tmp_path):
    data = Path(synth.make_synthetic_category(tmp_path / "b", size=16, n_train=2, n_test_good=1, n_test_bad=1,
                                              layout="btad"))
    shutil.copy(data / "ground_truth/ko/003.png", data / "ground_truth/ko/009.png")
    with pytest.raises(UserError, match=r"mask .*009.png has no image"):
        common.list_samples(str(data), "test")


@pytest.mark.parametrize("resize", ["squash", "pad", "crop"])
def test_resize_keeps_geometry_and_maps_go_back(tmp_path, resize):
    a = np.zeros((20, 40), np.uint8)  # a wide image with a bright square in its right half
    a[5:15, 25:35] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    img = common.read_image(tmp_path / "wide.png", 16, resize)[..., 0]  # (16, 16)
    mask = evaluate.read_mask(tmp_path / "wide.png", 16, resize)
    assert img.shape == mask.shape == (16, 16)
    assert np.array_equal(img > 127, mask) or resize == "squash"
    if resize == "pad":  # the long side fills the square, 4 black rows above and below
        assert not img[:4].any() and not img[-4:].any()
    back = evaluate.map_to_image(torch.from_numpy(mask).float()[None, None], (20, 40), 16, resize, (20, 40))[0, 0]
    assert back.shape == (20, 40)
    assert (back > 0.5)[10, 27] and not (back > 0.5)[10, 15]  # the square lands where it was (crop: x 10-30 seen)
    assert evaluate.metric_frame(20, 40, 16) == (8, 16)


def test_squash_warns_once_for_non_square_images(tmp_path, capsys):
    root = make_mvtec(tmp_path / "c", n_train=2)
    Image.new("RGB", (48, 32)).save(root / "train/good/000.png")
    for resize in ("squash", "squash", "pad"):
        common.load_train(str(root), 16, resize)
    assert capsys.readouterr().err.count("not square") == 1


def test_train_split_is_decoded_once_and_callers_cannot_change_it(tmp_path, monkeypatch):
    data = synth.make_synthetic_category(tmp_path / "d", size=16, n_train=4, n_test_good=1, n_test_bad=1)
    decoded, real = [], common.decode
    monkeypatch.setattr(common, "decode", lambda *a, **k: (decoded.extend(a[0]), real(*a, **k))[1])
    args = Namespace(data=data, image_size=16, holdout=0, resize="squash", train_fraction=1.0)
    first = common.train_images(args)
    first.zero_()  # a caller writing into its batch
    again = common.train_images(args)
    assert len(decoded) == 4  # the second call read no file ...
    assert again.any()  # ... and got the images, not the caller's zeros


def test_holdout_is_fixed_and_disjoint():
    train, hold = common.holdout_indices(50, 0.1)
    assert len(hold) == 5 and not set(train) & set(hold) and len(train) + len(hold) == 50
    assert common.holdout_indices(50, 0.1) == (train, hold)
    assert common.holdout_indices(10, 0.0) == (list(range(10)), [])


# ----------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        common.list_samples(str(tmp_path / "nope"), "train")


def test_not_a_dataset(tmp_path):
    (tmp_path / "cat" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="not a category in a layout .*MVTec AD 2.*BTAD.*VisA.*plain folder"):
        common.list_samples(str(tmp_path / "cat"), "train")


def test_no_training_images(tmp_path):
    root = make_mvtec(tmp_path / "c", n_train=0)
    with pytest.raises(UserError, match="no train images"):
        common.list_samples(str(root), "train")


def test_mask_without_image(tmp_path):
    root = make_mvtec(tmp_path / "c")
    shutil.copy(root / "ground_truth/crack/000_mask.png", root / "ground_truth/crack/007_mask.png")
    with pytest.raises(UserError, match=r"mask .*007_mask.png has no image"):
        common.list_samples(str(root), "test")


def test_anomalous_image_without_mask_is_image_level(tmp_path):
    root = make_mvtec(tmp_path / "c")
    (root / "ground_truth/crack/001_mask.png").unlink()
    samples = common.list_samples(str(root), "test")
    assert [(Path(s.path).name, s.label, s.mask is not None) for s in samples if s.label] == \
        [("000.png", 1, True), ("001.png", 1, False)]
    split = evaluate.load_test(str(root), 16)
    assert split.has_mask.tolist() == [False if Path(s.path).name == "001.png" and s.label else True
                                       for s in split.samples]
    shutil.rmtree(root / "ground_truth")  # no masks at all
    assert all(s.mask is None for s in common.list_samples(str(root), "test"))


def test_mask_folder_without_test_folder(tmp_path):
    root = make_mvtec(tmp_path / "c")
    shutil.copytree(root / "ground_truth/crack", root / "ground_truth/scratch")
    with pytest.raises(UserError, match=r"mask .*scratch.* has no image"):
        common.list_samples(str(root), "test")


def test_visa_without_csv(toy_visa, tmp_path):
    shutil.copytree(toy_visa, tmp_path / "toy")
    with pytest.raises(UserError, match="split_csv/1cls.csv is missing"):
        common.detect_layout(tmp_path / "toy")


def test_truncated_image_is_skipped_with_its_name(tmp_path, capsys):
    root = make_mvtec(tmp_path / "c", n_train=3)
    bad = root / "train/good/001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    assert len(common.load_train(str(root), 16)) == 2
    assert "001.png" in capsys.readouterr().err


def test_all_images_unreadable(tmp_path):
    root = make_mvtec(tmp_path / "c", n_train=2)
    for p in (root / "train/good").iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(UserError, match="could be read"):
        common.load_train(str(root), 16)


@pytest.mark.parametrize("size,depth,ok", [(256, 5, True), (96, 5, True), (100, 5, False), (16, 5, False), (64, 0, False)])
def test_size_and_depth_checks(size, depth, ok):
    argv = ["--data", "x", "--image_size", str(size), "--depth", str(depth)]
    if ok:
        args = stage1_rcae.get_args(argv)
        assert (args.image_size, args.depth) == (size, depth)
    else:
        with pytest.raises(UserError, match="--depth must be|cannot be halved"):
            stage1_rcae.get_args(argv)


# ----------------------------------------------------------------------------- augmentation, image gradient


def test_pseudo_anomaly_mask_is_exact_and_reproducible():
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    for seed in range(25):
        out, mask = common.pseudo_anomaly(img, torch.Generator().manual_seed(seed))
        assert out.shape == img.shape and mask.shape == (1, 64, 64)
        assert out.min() >= 0 and out.max() <= 1
        changed = (out - img).abs().amax(0)
        thr = max(1 / 255, common.MIN_VISIBLE * float(img.std()))
        assert torch.equal(mask[0] > 0, (changed > thr) & (mask[0] > 0)) and (mask[0] > 0).any()  # visible only
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        again = common.pseudo_anomaly(img, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again[0]) and torch.equal(mask, again[1])
    a = common.pseudo_anomaly(img, torch.Generator().manual_seed(0))[1]
    b = common.pseudo_anomaly(img, torch.Generator().manual_seed(1))[1]
    assert not torch.equal(a, b)


def test_pseudo_anomaly_sizes_scale_with_image():
    def mean_area(size):
        img = torch.rand(3, size, size)
        return np.mean([common.pseudo_anomaly(img, torch.Generator().manual_seed(s))[1].mean() for s in range(30)])
    # the same fraction of the image at 128 and 512 px (block sizes scale with H / 1024)
    assert 0.3 < mean_area(128) / mean_area(512) < 3


def test_pseudo_anomaly_mask_leaves_out_invisible_changes():
    """A patch pasted onto similar texture changes pixels by almost nothing: those are not labelled."""
    ramp = torch.linspace(0.4, 0.6, 64)
    img = (ramp[None, :, None] + 0.0 * ramp[None, None, :]).expand(3, 64, 64).contiguous()  # smooth, gray
    tiny = 0
    for seed in range(40):
        out, mask = common.pseudo_anomaly(img, torch.Generator().manual_seed(seed))
        changed = (out - img).abs().amax(0)
        thr = common.MIN_VISIBLE * float(img.std())
        assert (changed[mask[0] > 0] > thr).all()
        tiny += int(((changed > 0) & (changed <= thr)).sum())
    assert tiny > 0  # such changes happened, and the masks left them out


def save_untrained_chain(out, data, **stage1_flags):
    """Stage-1 and stage-2 checkpoints of untrained models in `out`, as a plain command at 64 px, depth 3 writes
    them (any stage1_flags given too): what stages 2 and 3 load, with no training."""
    a1 = stage1_rcae.get_args(quick_args(data, out, **stage1_flags))
    rcae = stage1_rcae.RcAE(stage1_rcae.Config(width=4, depth=a1.depth, image_size=a1.image_size))
    common.save_checkpoint(f"{out}/stage1_rcae.pt", "stage1_rcae", rcae, asdict(rcae.cfg), a1, 1)
    a2 = stage2_dpn.get_args(quick_args(data, out, image_size=None, depth=None))
    dpn = stage2_dpn.DPN(stage2_dpn.Config(width=4, depth=a1.depth, image_size=a1.image_size))
    common.save_checkpoint(f"{out}/stage2_dpn.pt", "stage2_dpn", dpn, asdict(dpn.cfg), a2, 1)


class Trained(Exception):
    """Raised in place of common.train: what a stage's main passed it, with nothing trained."""


def train_kwargs(monkeypatch, main, argv):
    """The keyword arguments `main(argv)` hands to common.train (it stops there)."""
    def stop(**kw):
        raise Trained(kw)

    monkeypatch.setattr(common, "train", stop)
    with pytest.raises(Trained) as e:
        main(argv)
    return e.value.args[0]


def test_stages_1_and_3_draw_pseudo_anomalies_by_their_flags_and_stage_2_none(toy_data, tmp_path, monkeypatch):
    """--anomaly_prob, --anomaly_size and --anomaly_colour reach the batches of stages 1 and 3 (what main hands
    common.train): on a dark batch "image" colours stay below its brightest pixel, "uniform" ones do not, and
    "relative" draws other anomalies than "scaled" from the same generator; --anomaly_prob 0 leaves the images
    clean. Stage 2 trains on the clean images (paper)."""
    save_untrained_chain(tmp_path, toy_data)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.25  # dark
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    inherited = dict(image_size=None, depth=None)  # stage 3 takes them from the stage-1 checkpoint
    for main, key, upstream in ((stage1_rcae.main, "input", {}), (stage3_crd.main, "image", inherited)):
        def batch(**flags):
            kw = train_kwargs(monkeypatch, main, quick_args(toy_data, tmp_path, **upstream, **flags))
            return kw["make_batch"](x, g())[key]

        uniform = batch(anomaly_prob=1.0, anomaly_colour="uniform")
        image = batch(anomaly_prob=1.0, anomaly_colour="image")
        assert uniform.max() > 0.3 >= image.max(), main.__module__
        assert not torch.equal(batch(anomaly_prob=1.0, anomaly_size="relative"), uniform), main.__module__
        assert torch.equal(batch(anomaly_prob=0.0), x), main.__module__
    kw = train_kwargs(monkeypatch, stage2_dpn.main, quick_args(toy_data, tmp_path, image_size=None, depth=None))
    assert kw["make_batch"](x, g()).keys() == {"image"} and torch.equal(kw["make_batch"](x, g())["image"], x)


def test_pseudo_anomaly_refuses_a_misspelt_colour():
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="colours"):  # a typo must not silently draw uniform colours
        common.pseudo_anomaly(img, torch.Generator().manual_seed(0), colours="rgb")


def test_image_colours_stay_in_the_images_range():
    """--anomaly_colour image: colour blocks and cracks inside each channel's range of their own image (a dark
    image gets dark anomalies, still visible ones; a gray image gray ones); uniform colours leave that range."""
    dark = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    dark *= torch.tensor([0.2, 0.1, 0.3])[:, None, None]  # a dark colour image, each channel its own range
    gray = dark[:1].expand(3, 64, 64).contiguous()
    lo, hi = dark.amin((1, 2), keepdim=True), dark.amax((1, 2), keepdim=True)
    outside = 0
    for seed in range(20):
        g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        out, mask = common.pseudo_anomaly(dark, g(), size_mode="relative", colours="image")
        assert mask.sum() > 0 and (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
        out, mask = common.pseudo_anomaly(gray, g(), size_mode="relative", colours="image")
        assert mask.sum() > 0 and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        assert out.max() <= gray.max() + 1e-6
        out, _ = common.pseudo_anomaly(dark, g(), size_mode="relative")  # uniform, the default
        outside += int(((out < lo - 1e-6) | (out > hi + 1e-6)).any())
    assert outside >= 15


def test_gray_images_get_gray_pseudo_anomalies():
    gray = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0)).expand(3, 64, 64).contiguous()
    colour = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    coloured = 0
    for seed in range(20):
        out, mask = common.pseudo_anomaly(gray, torch.Generator().manual_seed(seed))
        assert mask.sum() > 0 and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        out, mask = common.pseudo_anomaly(colour, torch.Generator().manual_seed(seed))
        coloured += int(((out - colour).abs().sum(0) > 0).sum())
    assert coloured > 0


@pytest.mark.parametrize("mode", common.ANOMALY_SIZES)
def test_pseudo_anomaly_size_modes(mode):
    def mean_area(size):
        img = torch.rand(3, size, size)
        return np.mean([common.pseudo_anomaly(img, torch.Generator().manual_seed(s), size_mode=mode)[1].mean()
                        for s in range(30)])
    ratio = mean_area(128) / mean_area(512)  # fraction of the image at 128 px over that at 512 px
    assert 0.3 < ratio < 3  # every size mode keeps the fraction of the image
    if mode == "relative":
        assert mean_area(128) > 4 * np.mean([common.pseudo_anomaly(torch.rand(3, 128, 128), torch.Generator().manual_seed(
            s))[1].mean() for s in range(30)])  # far larger than the scaled reading at 128 px


def test_every_stage_draws_its_own_pseudo_anomalies():
    """Stage 3 must not train on exactly the corruptions stage 1 was fitted to remove (same seed, same step)."""
    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    s1 = common.Batches(images, 4, 0, 0, 3, partial(stage1_rcae.make_batch, anomaly_prob=1.0, depth=2),
                        stream="stage1_rcae")
    s3 = common.Batches(images, 4, 0, 0, 3, partial(stage3_crd.make_batch, anomaly_prob=1.0), stream="stage3_crd")
    for i in range(3):
        a, b = s1[i], s3[i]
        assert not torch.equal(a["input"], b["image"])
    again = common.Batches(images, 4, 0, 0, 3, partial(stage3_crd.make_batch, anomaly_prob=1.0), stream="stage3_crd")
    assert torch.equal(again[1]["image"], s3[1]["image"])  # still a pure function of (stream, seed, step)


def test_augment_batch_probability():
    x = torch.rand(8, 3, 32, 32)
    out, masks = common.augment_batch(x, torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(out, x) and masks.sum() == 0
    out, masks = common.augment_batch(x, torch.Generator().manual_seed(0), prob=1.0)
    assert (masks.flatten(1).sum(1) > 0).all()


def test_image_gradient():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1  # a vertical edge between columns 1 and 2
    g = common.image_gradient(x)
    assert g.shape == (1, 2, 4, 4)
    assert torch.equal(g[0, 0], torch.tensor([[0, 1.0, 0, 0]] * 4)) and g[0, 1].abs().sum() == 0
    assert common.image_gradient(torch.ones(2, 3, 5, 5)).abs().sum() == 0


@pytest.mark.parametrize("conv,shape", [(torch.nn.Conv2d(7, 4, 3, padding=1), (2, 7, 9, 9)),
                                        (torch.nn.Conv3d(7, 4, 3, padding=1), (2, 7, 3, 9, 9))])
def test_conv_cat_equals_conv_of_concat(conv, shape):
    """Values and gradients (inputs and weights) of conv(cat(parts)) and conv_cat(conv, *parts) agree."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    results = []
    for split in (False, True):
        parts = [x[:, :2].clone().requires_grad_(True), x[:, 2:].contiguous(memory_format=fmt).requires_grad_(True)]
        conv.zero_grad()
        y = common.conv_cat(conv, *parts) if split else conv(torch.cat(parts, 1))
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results.append([y, parts[0].grad, parts[1].grad, conv.weight.grad.clone(), conv.bias.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="the parts have 2 channels, the conv takes 7"):
        common.conv_cat(conv, x[:, :2])


def test_topk_mean():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0, :5] = 1
    assert stage3_crd.topk_mean(maps, 0.05).tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_and_wrong_stage(tmp_path):
    m = torch.nn.Linear(3, 2)
    path = tmp_path / "a.pt"
    common.save_checkpoint(path, "s1", m, {"w": 3}, Namespace(lr=0.1, t=(1, 2)), 7)
    ck = common.load_checkpoint(path, "s1")
    assert ck["step"] == 7 and ck["args"]["t"] == [1, 2] and torch.equal(ck["model"]["weight"], m.weight)
    with pytest.raises(UserError, match="'s1' checkpoint, expected 's2'"):
        common.load_checkpoint(path, "s2")
    with pytest.raises(UserError, match="no s2 checkpoint .*run `python x.py` first"):
        common.load_checkpoint(tmp_path / "none.pt", "s2", hint="python x.py")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a checkpoint this code wrote.*--overwrite"):
        common.load_checkpoint(tmp_path / "junk.pt", "s1")


def test_interrupted_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    m = torch.nn.Linear(3, 2)
    path = tmp_path / "a.pt"
    common.save_checkpoint(path, "s1", m, {}, {}, 1)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, "s1", m, {}, {}, 2)
    monkeypatch.undo()
    assert common.load_checkpoint(path, "s1")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


def test_stages_2_and_3_inherit_the_stage_1_settings(toy_data, tmp_path, capsys):
    """Image size, depth, holdout, resize and train fraction come from the stage-1 checkpoint (stage2_dpn.upstream_rcae,
    for stage 3 too); stages 2 and 3 have no such flags to conflict with it."""
    set_by_stage1 = dict(image_size=32, depth=2, holdout=0.25, resize="pad", train_fraction=0.5)
    save_untrained_chain(tmp_path, toy_data, **set_by_stage1)
    assert set(common.INHERITED) == set(set_by_stage1)
    for stage in (stage2_dpn, stage3_crd):
        args = stage.get_args(quick_args(toy_data, tmp_path, image_size=None, depth=None))
        assert not set(common.INHERITED) & set(vars(args))
        stage2_dpn.upstream_rcae(args)
        assert {k: getattr(args, k) for k in common.INHERITED} == set_by_stage1, stage.STAGE
        for flag, value in set_by_stage1.items():
            with pytest.raises(SystemExit) as e:
                stage.get_args(quick_args(toy_data, tmp_path, **{"image_size": None, "depth": None, flag: value}))
            assert e.value.code == 2 and f"unrecognized arguments: --{flag}" in capsys.readouterr().err


def test_batches_are_a_function_of_seed_and_step():
    images = torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 1, 2, 2).contiguous()
    take = lambda x, gen: {"x": (x[:, 0, 0, 0] * 255).round().long()}  # noqa: E731
    full = common.Batches(images, 4, 0, 0, 6, take)
    seen = torch.cat([full[i]["x"] for i in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # epoch 1 visits every image once
    resumed = common.Batches(images, 4, 0, 3, 6, take)
    assert torch.equal(resumed[0]["x"], full[3]["x"])


def test_synthetic_generator_cli(tmp_path):
    synth.main(["--out", str(tmp_path / "s"), "--size", "32", "--n_train", "4", "--n_test", "2"])
    assert len(common.list_samples(str(tmp_path / "s"), "test")) == 4
    synth.main(["--out", str(tmp_path / "v"), "--size", "32", "--layout", "visa", "--n_train", "3", "--n_test", "1"])
    rows = list(csv.DictReader(open(tmp_path / "v" / "split_csv" / "1cls.csv")))
    assert {r["split"] for r in rows} == {"train", "test"}


def test_train_loop_applies_lr_schedule_and_drops_optimizer_when_done(tmp_path):
    model = torch.nn.Conv2d(3, 3, 1)
    seen = []

    def loss_fn(net, b):
        return (net(b["x"]) - b["x"]).pow(2).mean(), {}

    def lr_at(step, total):
        seen.append((step, total))
        return 0.5 if step > 2 else 1.0

    args = Namespace(device="cpu", lr=0.1, epochs=1, batch_size=2, max_steps=4, overwrite=False, compile=0,
                     seed=0, amp=0, save_every=2)
    ck = common.train(stage="t", model=model, model_config={}, args=args, images=torch.zeros(8, 3, 4, 4, dtype=torch.uint8),
                      make_batch=lambda x, gen: {"x": x}, loss_fn=loss_fn, ckpt_path=tmp_path / "t.pt", lr_at=lr_at)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert ck["step"] == 4 and "optimizer" not in ck


# ----------------------------------------------------------------------------- --train_fraction (Table 5)


@pytest.mark.parametrize("n", [1, 9, 24, 209])
def test_train_fractions_are_nested_and_fixed(n, monkeypatch):
    """common.train_images with --holdout 0 on n images whose pixel is their index: the indices each fraction keeps."""
    monkeypatch.setattr(common, "load_train", lambda *a: torch.arange(n, dtype=torch.uint8)[:, None, None, None])
    kept = lambda f: common.train_images(Namespace(data="x", image_size=1, resize="squash", holdout=0.0,  # noqa: E731
                                                   train_fraction=f))[:, 0, 0, 0].tolist()
    fracs = (0.1, 0.25, 0.5, 0.75, 1.0)
    subsets = [kept(f) for f in fracs]
    assert [len(s) for s in subsets] == [max(1, round(n * f)) for f in fracs]
    assert subsets[-1] == list(range(n))
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) <= set(large)  # 10% inside 25% inside 50% ...
    torch.manual_seed(123)  # the global seed (--seed) does not move the subset
    assert kept(0.25) == subsets[1]
    if n >= 24:  # a random draw, not the first files of the sorted list
        assert subsets[1] != list(range(len(subsets[1])))


def test_train_fraction_leaves_the_holdout_alone(tmp_path):
    data = synth.make_synthetic_category(tmp_path / "c", size=32, n_train=20, n_test_good=1, n_test_bad=1)
    args = lambda f: Namespace(data=data, image_size=32, holdout=0.1, resize="squash", train_fraction=f)  # noqa: E731
    full, hold = common.train_images(args(1.0)), common.train_images(args(1.0), "holdout")
    quarter = common.train_images(args(0.25))
    assert len(full) == 18 and len(hold) == 2 and len(quarter) == round(18 * 0.25)
    as_set = lambda t: {bytes(x.flatten().numpy()) for x in t}  # noqa: E731
    assert as_set(quarter) <= as_set(full) and not as_set(quarter) & as_set(hold)
    assert torch.equal(common.train_images(args(0.25), "holdout"), hold)


@pytest.mark.parametrize("frac", ["0", "1.5", "-0.1"])
def test_train_fraction_out_of_range_is_refused(frac):
    with pytest.raises(UserError, match=r"--train_fraction must be in \(0, 1\]"):
        stage1_rcae.get_args(["--data", "x", "--train_fraction", frac])


def test_train_loop_sets_the_optimiser_lr_from_the_schedule(tmp_path):
    """A multiplier of 0 after step 2 leaves Adam nothing to move: 4 such steps end where 2 plain ones did."""
    def run(max_steps, lr_at, name):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 3, 1)
        args = Namespace(device="cpu", lr=0.1, epochs=1, batch_size=2, max_steps=max_steps, overwrite=False,
                         compile=0, seed=0, amp=0, save_every=100)
        images = torch.randint(0, 255, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        common.train(stage="t", model=model, model_config={}, args=args, images=images,
                     make_batch=lambda x, gen: {"x": x}, loss_fn=lambda net, b: ((net(b["x"]) - 0.5).pow(2).mean(), {}),
                     ckpt_path=tmp_path / f"{name}.pt", lr_at=lr_at)
        return model.weight.detach().clone()

    two = run(2, None, "two")
    assert torch.equal(run(4, lambda step, total: float(step <= 2), "stopped"), two)
    assert not torch.equal(run(4, None, "four"), two)


def test_every_step_runs_at_the_constant_lr(tmp_path, monkeypatch):
    """With no lr_at (every recursion stage: a constant learning rate, as in the paper) each step runs at --lr."""
    seen, adam_step = [], torch.optim.Adam.step

    def recording_step(self, *a, **k):  # the lr each optimiser step runs at
        seen.append(self.param_groups[0]["lr"])
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    args = Namespace(device="cpu", lr=0.1, epochs=1, batch_size=2, max_steps=4, overwrite=True, compile=0, seed=0,
                     amp=0, save_every=100)
    common.train(stage="t", model=torch.nn.Conv2d(3, 3, 1), model_config={}, args=args,
                 images=torch.zeros(8, 3, 4, 4, dtype=torch.uint8), make_batch=lambda x, gen: {"x": x},
                 loss_fn=lambda net, b: (net(b["x"]).pow(2).mean(), {}), ckpt_path=tmp_path / "constant.pt")
    assert seen == pytest.approx([0.1] * 4)


def test_ema_saves_the_average_of_the_weights_and_leaves_training_alone(tmp_path):
    """--ema DECAY (stage1_rcae.EMA): the raw weights take the same steps as without it; a finished run saves their
    moving average (decay_t = min(DECAY, (1 + t) / (10 + t))), and an interrupted run resumes both."""
    images = torch.randint(0, 255, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run(name, ema, stop_at=None):
        torch.manual_seed(0)
        model, seen = torch.nn.Conv2d(3, 3, 1), []

        def loss_fn(net, b):
            if len(seen) + 1 == stop_at:  # Ctrl-C in step stop_at: the steps before it are saved
                raise KeyboardInterrupt
            seen.append(net.weight.detach().clone())  # the weights each step starts from
            return (net(b["x"]) - 0.5).pow(2).mean(), {}

        args = Namespace(device="cpu", lr=0.1, epochs=2, batch_size=2, max_steps=6, overwrite=False, compile=0,
                         seed=0, amp=0, save_every=100, ema=ema)
        ck = common.train(stage="t", model=model, model_config={}, args=args, images=images,
                          make_batch=lambda x, gen: {"x": x}, loss_fn=loss_fn, ckpt_path=tmp_path / f"{name}.pt",
                          validate=lambda m: {"w": float(m.weight.sum())},
                          ema=stage1_rcae.EMA(model, ema) if ema else None)
        return ck, seen + [model.weight.detach().clone()]

    plain_ck, plain_w = run("plain", 0.0)  # the weights each step starts from, then the last step's
    ema_ck, ema_w = run("ema", 0.9)  # the same, then what the model holds after training: the average
    assert all(torch.equal(a, b) for a, b in zip(plain_w[:-1], ema_w[:-1])) and len(ema_w) == 7  # training unchanged
    assert torch.equal(plain_ck["model"]["weight"], plain_w[-1]) and plain_ck["args"]["ema"] == 0.0
    avg = plain_w[0].clone()
    for t, w in enumerate(plain_w[1:], start=1):
        avg.lerp_(w, 1 - min(0.9, (1 + t) / (10 + t)))
    assert torch.allclose(ema_ck["model"]["weight"], avg, atol=1e-7) and ema_ck["args"]["ema"] == 0.9
    assert torch.equal(ema_w[-1], ema_ck["model"]["weight"])  # the caller's model holds what was saved
    assert ema_ck["val"]["w"] == pytest.approx(float(avg.sum()), abs=1e-5)  # the average is what is validated
    assert not torch.allclose(avg, plain_w[-1], atol=1e-3)  # the average is not the last step's weights

    with pytest.raises(common.Interrupted):
        run("resumed", 0.9, stop_at=2)  # stops (and saves) after step 1: raw weights + the average
    part = common.load_checkpoint(tmp_path / "resumed.pt", "t")
    assert part["step"] == 1 and "ema" in part and "optimizer" in part
    resumed, _ = run("resumed", 0.9)
    assert resumed["step"] == 6 and torch.allclose(resumed["model"]["weight"], ema_ck["model"]["weight"], atol=1e-7)


def test_ema_is_a_stage_1_flag_and_is_checked(capsys):
    assert stage1_rcae.get_args(["--data", "x"]).ema == 0.0  # off: the paper saves the last step's weights
    assert stage1_rcae.get_args(["--data", "x", "--ema", "0.99"]).ema == 0.99
    with pytest.raises(UserError, match=r"--ema must be in \[0, 1\)"):
        stage1_rcae.get_args(["--data", "x", "--ema", "1"])
    for stage in (stage2_dpn, stage3_crd):  # they train on the frozen (averaged) weights of stage 1
        assert not hasattr(stage.get_args(["--data", "x"]), "ema")
        with pytest.raises(SystemExit) as e:
            stage.get_args(["--data", "x", "--ema", "0.99"])
        assert e.value.code == 2 and "unrecognized arguments: --ema" in capsys.readouterr().err
