"""stage1_rcae.py: shapes, shared weights, gradients, Eq. (5), training, checkpoint, resume, NaN guard."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import quick_args

import common
import stage1_rcae
import stage2_dpn
import stage3_crd
import synth
from stage1_rcae import Config, RcAE, recon_loss


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A second category like toy_data (other seed, other images): for the resume refusals."""
    return synth.make_synthetic_category(tmp_path_factory.mktemp("other") / "toy", size=64, n_train=24,
                                         n_test_good=6, n_test_bad=6, seed=5)


def interrupt_at(monkeypatch, call):
    """Ctrl-C in the middle of the `call`-th step of stage 1 (in its loss): common.train saves the step before it,
    with the optimiser state, and raises common.Interrupted."""
    real, calls = stage1_rcae.recon_loss, []

    def loss(recon, target):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(recon, target)

    monkeypatch.setattr(stage1_rcae, "recon_loss", loss)


@pytest.mark.parametrize("size,depth", [(32, 1), (64, 3), (96, 5), (128, 5)])
def test_shapes_every_depth(size, depth):
    model = RcAE(Config(width=8, depth=depth, image_size=size))
    x = torch.rand(2, 3, size, size)
    codes = model.compress(x, depth)
    assert [c.shape[-1] for c in codes] == [size // 2 ** i for i in range(1, depth + 1)]  # Eq. (3)
    assert all(c.shape[1] == 3 for c in codes)  # the spaces X_i keep C channels
    assert model(x, depth).shape == x.shape
    allr = model.reconstruct_all(x)
    assert allr.shape == (2, depth, 3, size, size)
    for n in range(1, depth + 1):  # sharing the compression path changes nothing
        assert torch.allclose(allr[:, n - 1], model(x, n), atol=1e-6)
    # channels_last stays inside the blocks: callers get plain tensors (.view works)
    assert model(x, depth).is_contiguous() and allr.is_contiguous()


def test_every_recursion_step_applies_the_same_blocks():
    """Eq. (3)-(4) recomputed by hand: depth n is n times down(E(.)) then n times up(D(.)), with one E and D."""
    model = RcAE(Config(width=8, depth=3))
    x = torch.rand(2, 3, 32, 32)
    for n in (1, 2, 3):
        h = x
        for _ in range(n):
            h = model.down(model.E(h))
        for _ in range(n):
            h = model.up(model.D(h))
        assert torch.allclose(model(x, n), h, atol=1e-6), n


def test_gradients_reach_every_parameter():
    model = RcAE(Config(width=8, depth=3))
    x = torch.rand(2, 3, 32, 32)
    loss, _ = recon_loss(model(x, 3), x)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_depth_one_uses_every_block():
    model = RcAE(Config(width=8, depth=2))
    x = torch.rand(1, 3, 16, 16)
    recon_loss(model(x, 1), x)[0].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_make_batch_draws_the_depth_per_batch_and_keeps_the_clean_target():
    x = torch.rand(4, 3, 32, 32)
    depths = [int(stage1_rcae.make_batch(x, torch.Generator().manual_seed(s), 4, anomaly_prob=0.0)["n"])
              for s in range(200)]
    counts = [depths.count(n) for n in (1, 2, 3, 4)]
    assert min(counts) > 30, counts  # uniform over 1..N: 50 each expected
    b = stage1_rcae.make_batch(x, torch.Generator().manual_seed(0), 4, anomaly_prob=1.0)
    assert torch.equal(b["target"], x)  # denoising: the clean image is the target ...
    assert all(not torch.equal(b["input"][i], x[i]) for i in range(4))  # ... of an input with pseudo anomalies


@pytest.mark.parametrize("share", [1, 0])
def test_updown_init_pca_starts_at_the_best_linear_block_code(share, toy_data, tmp_path, monkeypatch):
    """--updown_init pca: up(down(x)) of the standardised image is its projection onto the top-C principal
    components of the training images' 2x2 blocks, at every level; main() applies it after fit_standardise,
    and the default leaves PyTorch's init."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(20, 3, 4, 4, generator=g), size=16, mode="bilinear")
    images = ((smooth + 0.2 * torch.rand(20, 3, 16, 16, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    model = RcAE(Config(width=8, depth=3, standardise=1, share=share))
    model.fit_standardise(images)
    model.init_updown_pca(images)
    x = (common.to_float(images) - model.in_mean) / model.in_std
    b = torch.nn.functional.unfold(x, 2, stride=2).transpose(1, 2).flatten(0, 1)  # (blocks, 12)
    mean = b.mean(0)
    v = torch.linalg.svd(b - mean, full_matrices=False).Vh[:3]
    want = (b - mean) @ v.T @ v + mean  # the best rank-3 affine code of each block
    for i in (1, 2, 3):
        got = model.level(model.up, i)(model.level(model.down, i)(x))
        got = torch.nn.functional.unfold(got, 2, stride=2).transpose(1, 2).flatten(0, 1)
        d = got - want  # up's bias is per channel, the blocks' mean per pixel: equal up to that small offset
        assert (d - d.mean(0)).abs().max() < 1e-3 and d.mean(0).abs().max() < 0.05
        assert (got - b).pow(2).mean() < 0.5 * (mean - b).pow(2).mean()
    seen, real = [], RcAE.init_updown_pca
    monkeypatch.setattr(RcAE, "init_updown_pca", lambda self, im: seen.append(float(self.in_std[0, 0])) or real(self, im))
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    assert seen == []
    stage1_rcae.main(quick_args(toy_data, tmp_path / "pca", max_steps=1, updown_init="pca"))
    assert len(seen) == 1 and seen[0] != 1.0  # after fit_standardise


def test_loss_eq5():
    x = torch.rand(2, 3, 16, 16)
    loss, parts = recon_loss(x, x)
    assert loss == 0 and parts["l1"] == 0 and parts["l1_grad"] == 0
    assert recon_loss(x + 0.1, x)[0] > 0
    # a constant shift has no gradient error; a lost edge does
    assert recon_loss(x + 0.1, x)[1]["l1_grad"] < 1e-6
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1
    assert recon_loss(torch.full_like(edge, 0.5), edge)[1]["l1_grad"] > 0


def test_two_step_run_writes_checkpoint_that_reloads(toy_data, tmp_path):
    out = tmp_path / "run"
    stage1_rcae.main(quick_args(toy_data, out))
    model, ck = stage1_rcae.load_rcae(out / "stage1_rcae.pt")
    assert ck["stage"] == "stage1_rcae" and ck["step"] == 2
    assert ck["model_config"] == {"channels": 3, "width": 32, "depth": 3, "image_size": 64, "standardise": 1,
                                  "arch": "rcae", "share": 1, "skip": 1}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    rebuilt = RcAE(Config(**ck["model_config"]))
    rebuilt.load_state_dict(ck["model"])
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(rebuilt.eval()(x), model(x))
    log = [json.loads(line) for line in open(out / "stage1_rcae.log.jsonl")]
    assert {"l1", "l1_grad", "img_per_s"} <= set([r for r in log if "loss" in r][-1])
    assert "ratio_mean_3" in log[-1]["val"]  # the reconstruction report closes the log


def test_resume_continues_from_saved_step(toy_data, tmp_path, capsys, monkeypatch):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    stage1_rcae.main(quick_args(toy_data, straight, max_steps=4))
    interrupt_at(monkeypatch, 2)
    with pytest.raises(common.Interrupted, match="holds step 1 of 4"):
        stage1_rcae.main(quick_args(toy_data, resumed, max_steps=4))
    monkeypatch.undo()
    assert torch.load(resumed / "stage1_rcae.pt", weights_only=True)["step"] == 1
    stage1_rcae.main(quick_args(toy_data, resumed, max_steps=4))
    assert "resuming from step 1 of 4" in capsys.readouterr().out
    a = torch.load(straight / "stage1_rcae.pt", weights_only=True)
    b = torch.load(resumed / "stage1_rcae.pt", weights_only=True)
    assert b["step"] == 4
    for k in a["model"]:  # same batches, same optimiser state: the same weights
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_finished_run_is_not_retrained(toy_data, tmp_path, capsys):
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    before = (tmp_path / "stage1_rcae.pt").stat().st_mtime_ns
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    assert "already trained" in capsys.readouterr().out
    assert (tmp_path / "stage1_rcae.pt").stat().st_mtime_ns == before


def test_other_settings_refused_without_overwrite(toy_data, tmp_path):
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    with pytest.raises(common.UserError, match="other settings .*width: 32 vs 8.*--overwrite"):
        stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1, width=8))
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1, width=8, overwrite=True))
    assert torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["model_config"]["width"] == 8


def test_resume_with_other_training_flags_refused(toy_data, tmp_path, monkeypatch):
    """Not only the network: a run that would continue with other pseudo anomalies, lr or seed is refused, and
    the checkpoint is left as it was; a longer run, another device or checkpoint interval continues."""
    interrupt_at(monkeypatch, 2)
    with pytest.raises(common.Interrupted, match="holds step 1 of 2"):
        stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=2))
    monkeypatch.undo()
    path = tmp_path / "stage1_rcae.pt"
    before = path.read_bytes()
    for flag in (dict(anomaly_colour="image"), dict(anomaly_size="relative"), dict(anomaly_prob=1.0),
                 dict(lr=3e-4), dict(seed=1), dict(ema=0.5)):
        name, value = next(iter(flag.items()))
        with pytest.raises(common.UserError, match=f"other settings .*{name}: .* vs {value}.*--overwrite"):
            stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=2, **flag))
    assert path.read_bytes() == before
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=3, save_every=7, device="cpu"))
    assert torch.load(path, weights_only=True)["step"] == 3


def test_resume_on_other_images_refused(toy_data, other_data, tmp_path, monkeypatch):
    """--data may be spelt another way (a link, a relative path), but a run continued on other images is refused
    and its checkpoint left as it was, unfinished or finished: train compares the training images' sha256, not
    the path. (Stages 2-3: test_stage23.py.)"""
    out, link = tmp_path / "run", tmp_path / "link"
    interrupt_at(monkeypatch, 2)
    with pytest.raises(common.Interrupted, match="holds step 1 of 2"):
        stage1_rcae.main(quick_args(toy_data, out, max_steps=2))
    monkeypatch.undo()
    path = out / "stage1_rcae.pt"
    before = path.read_bytes()
    with pytest.raises(common.UserError, match="trained on other images than --data .*--overwrite"):
        stage1_rcae.main(quick_args(other_data, out, max_steps=2))
    assert path.read_bytes() == before
    link.symlink_to(toy_data)
    stage1_rcae.main(quick_args(link, out, max_steps=2))
    assert torch.load(path, weights_only=True)["step"] == 2
    finished = path.read_bytes()
    with pytest.raises(common.UserError, match="trained on other images than --data .*--overwrite"):
        stage1_rcae.main(quick_args(other_data, out, max_steps=2))  # not "already trained"
    assert path.read_bytes() == finished


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_data, tmp_path, monkeypatch):
    real = stage1_rcae.recon_loss
    calls = []

    def nan_at_third_step(recon, target):
        calls.append(1)
        loss, parts = real(recon, target)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(stage1_rcae, "recon_loss", nan_at_third_step)
    with pytest.raises(common.UserError, match="loss is nan at step 3.*last good checkpoint"):
        stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=5, save_every=2))
    ck = torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("flags,msg", [
    (dict(image_size=100), "cannot be halved 3 times"),
    (dict(depth=0), "--depth must be >= 1"),
])
def test_bad_flags(toy_data, tmp_path, flags, msg):
    with pytest.raises(common.UserError, match=msg):
        stage1_rcae.main(quick_args(toy_data, tmp_path, **flags))


def test_bad_data_path_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: stage1_rcae.main(quick_args(str(tmp_path / "missing"), tmp_path)))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "stage1_rcae.pt").exists()


def test_visa_training(toy_visa, tmp_path):
    stage1_rcae.main(quick_args(toy_visa, tmp_path, max_steps=1))
    assert (tmp_path / "stage1_rcae.pt").is_file()


def test_reconstruction_report_is_logged_on_the_holdout(toy_data, tmp_path):
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=4, save_every=2))  # validates when it saves
    log = [json.loads(line) for line in open(tmp_path / "stage1_rcae.log.jsonl")]
    vals = [r for r in log if "val" in r]
    assert [r["step"] for r in vals] == [2, 4]
    rep = vals[-1]["val"]
    for n in (1, 2, 3):
        assert {f"l1_{n}", f"psnr_{n}", f"l1_blur_{n}", f"ratio_mean_{n}", f"ratio_blur_{n}"} <= set(rep)
        assert rep[f"ratio_mean_{n}"] == pytest.approx(rep[f"l1_{n}"] / rep["l1_mean"], rel=1e-4)
    assert torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["val"] == rep


class _Fixed(torch.nn.Module):
    """A stand-in RcAE whose every depth returns f(x): to check recon_report against known answers."""

    def __init__(self, f, depth=2):
        super().__init__()
        self.cfg, self.f, self.p = Config(depth=depth), f, torch.nn.Parameter(torch.zeros(1))

    def reconstruct_all(self, x):
        return torch.stack([self.f(x, n) for n in range(1, self.cfg.depth + 1)], 1)


def test_reconstruction_report_references():
    images = (torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    mean = stage1_rcae.recon_report(_Fixed(lambda x, n: x.mean((2, 3), keepdim=True).expand_as(x)), images, 2)
    assert mean["ratio_mean_1"] == pytest.approx(1, rel=1e-5) and mean["ratio_mean_2"] == pytest.approx(1, rel=1e-5)
    blur = stage1_rcae.recon_report(_Fixed(lambda x, n: torch.nn.functional.interpolate(
        torch.nn.functional.avg_pool2d(x, 2 ** n), size=x.shape[-2:], mode="bilinear", align_corners=False)), images)
    assert blur["ratio_blur_1"] == pytest.approx(1, rel=1e-5) and blur["ratio_blur_2"] == pytest.approx(1, rel=1e-5)
    perfect = stage1_rcae.recon_report(_Fixed(lambda x, n: x), images)
    assert perfect["l1_1"] == 0 and perfect["psnr_2"] >= 99


def test_standardise_makes_the_intensity_scale_irrelevant():
    """With --standardise 1 a copy of the data scaled by 0.25 is the same problem: the same weights give
    exactly the scaled reconstruction, so training cannot tell a dark category from a bright one."""
    images = torch.randint(5, 56, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8) * 4
    dark = images // 4  # the same images at a quarter of the intensity, exactly (20-220 -> 5-55)
    torch.manual_seed(0)
    a = RcAE(Config(width=8, depth=2, standardise=1))
    with torch.no_grad():  # weights whose output follows the input (PyTorch's init gives a near-constant output)
        for p in a.parameters():
            p.normal_(0, 0.2)
    b = RcAE(Config(width=8, depth=2, standardise=1))
    b.load_state_dict(a.state_dict())
    a.fit_standardise(images)
    b.fit_standardise(dark)
    assert torch.allclose(b.in_std, a.in_std * 0.25, rtol=1e-5)
    x = common.to_float(dark)
    assert torch.allclose(b(x, 2), a(x / 0.25, 2) * 0.25, atol=1e-6)
    plain = RcAE(Config(width=8, depth=2, standardise=0))
    plain.fit_standardise(dark)  # a no-op without standardise
    assert plain.in_std.eq(1).all() and plain.in_mean.eq(0).all()
    plain.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("in_")}, strict=False)
    assert not torch.allclose(plain(x, 2), plain(x / 0.25, 2) * 0.25, atol=1e-3)


def test_cpu_recipe_sets_defaults_and_explicit_flags_win(toy_data):
    assert sorted(common.RECIPES) == ["cpu", "paper"]
    paper = stage1_rcae.get_args(["--data", toy_data])  # the paper's settings
    assert (paper.image_size, paper.lr, paper.max_steps, paper.epochs) == (1024, 1e-4, None, 1500)
    assert (paper.updown_init, paper.ema, paper.anomaly_colour) == ("default", 0.0, "uniform")
    cpu = stage1_rcae.get_args(["--data", toy_data, "--recipe", "cpu"])
    assert (cpu.image_size, cpu.lr, cpu.max_steps) == (128, 1e-3, 1758)
    assert (cpu.updown_init, cpu.ema, cpu.anomaly_colour) == ("pca", 0.99, "image")
    mine = stage1_rcae.get_args(["--data", toy_data, "--recipe", "cpu", "--lr", "5e-4", "--image_size", "64"])
    assert (mine.image_size, mine.lr, mine.max_steps, mine.ema) == (64, 5e-4, 1758, 0.99)
    dpn = stage2_dpn.get_args(["--data", toy_data])
    assert (dpn.lr, dpn.max_steps, dpn.epochs) == (1e-4, None, 400)
    dpn = stage2_dpn.get_args(["--data", toy_data, "--recipe", "cpu"])
    assert (dpn.lr, dpn.max_steps) == (1e-3, 263)
    crd = stage3_crd.get_args(["--data", toy_data])  # Eq. (8) and (9) as written
    assert (crd.crd_input, crd.residual_scale, crd.loss, crd.init_prior) == ("refined", "none", "l2", 0.0)
    assert (crd.lr, crd.max_steps, crd.epochs, crd.anomaly_size) == (1e-4, None, 300, "scaled")
    crd = stage3_crd.get_args(["--data", toy_data, "--recipe", "cpu", "--anomaly_colour", "uniform"])
    assert not hasattr(crd, "image_size")  # inherited from the stage-1 checkpoint, not a flag
    assert (crd.crd_input, crd.residual_scale, crd.loss, crd.init_prior) == ("residual", "position", "focal", 0.01)
    assert (crd.lr, crd.max_steps, crd.anomaly_size, crd.anomaly_colour) == (1e-3, 258, "relative", "uniform")
    for recipe in common.RECIPES:  # every flag a recipe names is one of its stage's flags
        for module in (stage1_rcae, stage2_dpn, stage3_crd):
            module.get_args(["--data", toy_data, "--recipe", recipe])


# ----------------------------------------------------------------------------- Table 4 variants (issue 12)

VARIANTS = {"no sharing (Eq. (2))": dict(share=0), "no skip": dict(skip=0),
            "ConvAE (Eq. (2), single pass)": dict(arch="convae", share=0),
            "ConvAE without skip": dict(arch="convae", share=0, skip=0)}


@pytest.mark.parametrize("depth", [1, 3, 5])
@pytest.mark.parametrize("skip", [0, 1])
def test_no_sharing_has_n_times_the_parameters(depth, skip):
    shared = common.n_params(RcAE(Config(width=8, depth=depth, skip=skip)))
    assert common.n_params(RcAE(Config(width=8, depth=depth, skip=skip, share=0))) == depth * shared


def test_skip_removal_parameter_count():
    # dec1 of each of E and D reads w instead of 2w channels: w * C * 3 * 3 weights fewer each
    w, c = 8, 3
    full, bare = (common.n_params(RcAE(Config(width=w, depth=3, skip=s))) for s in (1, 0))
    assert full - bare == 2 * w * c * 9


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_variants_gradients_reach_every_parameter(kw):
    model = RcAE(Config(width=8, depth=3, **kw))
    x = torch.rand(2, 3, 32, 32)
    recon_loss(model(x), x)[0].backward()  # depth N: every level's block is on the path
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def count_calls(modules):
    calls = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("n", [1, 2, 4])
def test_shared_recursion_calls_one_block_n_times(n):
    model = RcAE(Config(width=8, depth=4))
    blocks = [m for m in model.modules() if isinstance(m, stage1_rcae.ConvAE)]
    assert blocks == [model.E, model.D]  # one encoder block, one decoder block, whatever N
    calls = count_calls([model.E, model.down, model.D, model.up])
    model(torch.rand(1, 3, 32, 32), n)
    assert calls == [n, n, n, n]  # Eq. (3)-(4): the same modules at every step


@pytest.mark.parametrize("n", [1, 2, 4])
def test_unshared_recursion_calls_each_level_once(n):
    model = RcAE(Config(width=8, depth=4, share=0))
    assert len(model.E) == len(model.D) == 4 and len({id(m) for m in model.E}) == 4
    enc, dec = count_calls(list(model.E)), count_calls(list(model.D))
    model(torch.rand(1, 3, 32, 32), n)
    assert enc == dec == [1] * n + [0] * (4 - n)  # Eq. (2): E_1..E_n then D_n..D_1, each once


def test_unshared_levels_run_in_order():
    # D_1 o ... o D_n o E_n o ... o E_1 (Eq. (2)): E_i and D_i are level i's, whatever the depth
    model = RcAE(Config(width=8, depth=3, share=0))
    order = []
    for name, m in [*((f"E{i + 1}", e) for i, e in enumerate(model.E)), *((f"D{i + 1}", d) for i, d in enumerate(model.D))]:
        m.register_forward_hook(lambda *_, name=name: order.append(name))
    model(torch.rand(1, 3, 32, 32), 2)
    assert order == ["E1", "E2", "D2", "D1"]


def test_block_without_skip_sees_only_the_half_resolution_path():
    """With the stride-2 path cut (enc2 = 0), a block without its skip outputs the same for every input;
    with the skip it still follows the input."""
    x = torch.rand(2, 3, 16, 16)
    for skip in (True, False):
        block = stage1_rcae.ConvAE(3, 3, 8, skip=skip)
        torch.nn.init.zeros_(block.enc2.weight)
        torch.nn.init.zeros_(block.enc2.bias)
        out = block(x)
        assert torch.allclose(out[0], out[1]) != skip


def test_convae_single_pass_at_depth_n():
    model = RcAE(Config(width=8, depth=3, arch="convae", share=0))
    x = torch.rand(2, 3, 32, 32)
    allr = model.reconstruct_all(x)  # the one output I_R^N stands for every depth
    assert allr.shape == (2, 3, 3, 32, 32)
    assert all(torch.equal(allr[:, k], model(x)) for k in range(3))
    with pytest.raises(ValueError, match="only its depth-3 output"):
        model(x, 1)
    gen = torch.Generator().manual_seed(0)
    batches = [stage1_rcae.make_batch(x, gen, 3, random_depth=False, anomaly_prob=0.5) for _ in range(8)]
    assert {int(b["n"]) for b in batches} == {3}
    assert len({int(stage1_rcae.make_batch(x, gen, 3, anomaly_prob=0.5)["n"]) for _ in range(30)}) == 3  # RcAE: 1..N


@pytest.mark.parametrize("flags", [dict(arch="convae", share=0, skip=0), dict(share=0), dict(skip=0)])
def test_variant_flags_train_and_describe_themselves(toy_data, tmp_path, monkeypatch, flags):
    depths = []
    real = stage1_rcae.make_batch

    def spy(*a, **kw):
        b = real(*a, **kw)
        depths.append(int(b["n"]))
        return b

    monkeypatch.setattr(stage1_rcae, "make_batch", spy)
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=6, image_size=32, **flags))
    model, ck = stage1_rcae.load_rcae(tmp_path / "stage1_rcae.pt")  # rebuilt from the checkpoint alone
    assert {k: ck["model_config"][k] for k in flags} == flags and ck["args"]["share"] == model.cfg.share
    assert common.n_params(model) == common.n_params(RcAE(Config(width=32, depth=3, **flags)))
    if flags.get("arch") == "convae":
        assert set(depths) == {3}  # no random depth
    else:
        assert len(set(depths)) > 1


def test_resume_refuses_another_model_config(toy_data, tmp_path):
    """The checkpoint's model_config is compared as well as its flags: a network other than the one this run builds
    is refused even where the flags agree."""
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    path = tmp_path / "stage1_rcae.pt"
    ck = torch.load(path, weights_only=True)
    ck["model_config"]["skip"] = 0  # args still say --skip 1
    torch.save(ck, path)
    with pytest.raises(common.UserError, match="other settings .*skip: 0 vs 1"):
        stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=2))


# ----------------------------------------------------------------------------- --ema


def test_ema_update_is_the_warmed_up_moving_average():
    """stage1_rcae.EMA: decay_t = min(DECAY, (1 + t) / (10 + t)) after step t; buffers that are not floats are
    copied; the average is a copy (the trained model is not touched)."""
    model = torch.nn.BatchNorm2d(2)
    ema = stage1_rcae.EMA(model, 0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model, 1)  # decay min(0.9, 2/11)
    w = ema.model.weight
    assert torch.allclose(w, start["weight"] + (3.0 - start["weight"]) * (1 - 2 / 11), atol=1e-6)
    assert int(ema.model.num_batches_tracked) == 7 and model.weight.detach().eq(3.0).all()
    before = w.clone()
    ema.update(model, 1000)  # decay 0.9
    assert torch.allclose(ema.model.weight, before + (3.0 - before) * 0.1, atol=1e-6)


def test_ema_saves_validates_and_resumes_the_average(toy_data, tmp_path, monkeypatch):
    """--ema DECAY: main hands stage1_rcae.EMA to common.train; the finished checkpoint holds the moving average of
    the weights, not the last step's, and the reconstruction report that closes the run was computed on it. An
    interrupted run keeps the average beside the raw weights and continues it: the same result as straight."""
    cks = {}
    for name, ema in (("plain", None), ("avg", 0.5)):
        stage1_rcae.main(quick_args(toy_data, tmp_path / name, max_steps=3, lr=1e-2, ema=ema))
        cks[name] = torch.load(tmp_path / name / "stage1_rcae.pt", weights_only=True)
    plain, avg = cks["plain"], cks["avg"]
    assert plain["args"]["ema"] == 0.0 and avg["args"]["ema"] == 0.5 and "ema" not in avg
    assert plain["model"].keys() == avg["model"].keys()
    assert any(not torch.allclose(plain["model"][k], avg["model"][k], atol=1e-4) for k in plain["model"])
    model, _ = stage1_rcae.load_rcae(tmp_path / "avg" / "stage1_rcae.pt")
    holdout = common.train_images(SimpleNamespace(**avg["args"]), part="holdout")
    rep = stage1_rcae.recon_report(model, holdout, avg["args"]["batch_size"])
    assert avg["val"] == pytest.approx(rep, rel=1e-6, abs=2e-6)  # the saved weights are the ones validated
    assert max(abs(plain["val"][f"l1_{n}"] - rep[f"l1_{n}"]) for n in (1, 2, 3)) > 2e-5  # (not the last step's)

    interrupt_at(monkeypatch, 2)
    with pytest.raises(common.Interrupted, match="holds step 1 of 3"):
        stage1_rcae.main(quick_args(toy_data, tmp_path / "cut", max_steps=3, lr=1e-2, ema=0.5))
    monkeypatch.undo()
    part = torch.load(tmp_path / "cut" / "stage1_rcae.pt", weights_only=True)
    assert part["step"] == 1 and "ema" in part and "optimizer" in part
    stage1_rcae.main(quick_args(toy_data, tmp_path / "cut", max_steps=3, lr=1e-2, ema=0.5))
    resumed = torch.load(tmp_path / "cut" / "stage1_rcae.pt", weights_only=True)
    assert resumed["step"] == 3
    for k in avg["model"]:
        assert torch.allclose(resumed["model"][k], avg["model"][k], atol=1e-6), k
