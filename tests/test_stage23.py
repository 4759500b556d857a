"""stage2_dpn.py and stage3_crd.py: shapes, Eq. (6)-(9), gradients, frozen upstream, the stage chain,
inheritance from stage 1 and every refusal, --use_depths (Table 6), holdout calibration, load_detector."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import quick_args

import common
import evaluate
import metrics
import stage1_rcae
import stage2_dpn
import stage3_crd
import synth
from common import UserError, image_gradient
from stage1_rcae import RcAE
from stage2_dpn import DPN, dpn_loss
from stage3_crd import CRD, crd_input, crd_loss, parse_depths


def rcae(depth=3, width=8):
    return RcAE(stage1_rcae.Config(width=width, depth=depth))


def frozen(model):
    """As common.build_from_checkpoint hands an upstream stage on."""
    return model.eval().requires_grad_(False)


def refused_flag(module, argv, flag, capsys):
    """argparse refuses the flag: exit code 2, and stderr names it."""
    with pytest.raises(SystemExit) as e:
        module.get_args(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def spy(mp, module, name):
    """Record the (model, ck) pairs a module's loader returns, to inspect the upstream used in training."""
    seen, real = [], getattr(module, name)

    def wrapper(path):
        seen.append(real(path))
        return seen[-1]

    mp.setattr(module, name, wrapper)
    return seen


def assert_untouched(model, path):
    """The in-memory upstream model is frozen, got no gradients, and still equals its checkpoint bitwise."""
    on_disk = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), on_disk[k]), k
    for p in model.parameters():
        assert not p.requires_grad and p.grad is None


# ----------------------------------------------------------------------------- stage 2: DPN


@pytest.mark.parametrize("channels,n,size", [(3, 5, 32), (3, 1, 20), (1, 3, 24)])
def test_dpn_shapes(channels, n, size):
    dpn = DPN(stage2_dpn.Config(channels=channels, depth=n, width=8))
    image = torch.rand(2, channels, size, size)
    recons = torch.rand(2, n, channels, size, size)
    assert dpn(recons[:, 0], image).shape == (2, channels, size, size)  # one depth
    assert dpn(recons, image).shape == recons.shape  # all depths in one call
    assert dpn.refine(recons, image).shape == recons.shape


def test_dpn_folding_matches_per_depth_calls():
    dpn = DPN(stage2_dpn.Config(depth=3, width=8))
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)
    image, recons = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 3, 16, 16)
    batched = dpn(recons, image)
    for n in range(3):
        assert torch.allclose(batched[:, n], dpn(recons[:, n], image), atol=1e-6)


def test_dpn_residual_is_zero_at_init():
    dpn = DPN(stage2_dpn.Config(depth=3, width=8))
    image, recons = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 3, 32, 32)
    assert torch.equal(dpn(recons, image), torch.zeros_like(recons))
    assert torch.equal(dpn.refine(recons, image), recons)  # I_D^n = I_R^n: the image is not broken


def test_dpn_of_zero_steps_is_the_identity(toy_data, tmp_path):
    """`stage2_dpn.py --max_steps 0` saves the untrained DPN, I_D^n = I_R^n: the README's "CRD without DPN"
    ablation (stage 3 then sees I - I_R^n) rests on it."""
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=2))
    stage2_dpn.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, max_steps=0))
    dpn, ck = stage2_dpn.load_dpn(tmp_path / "stage2_dpn.pt")
    assert ck["step"] == 0
    image, recons = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 3, 64, 64)
    assert torch.equal(dpn.refine(recons, image), recons)


def test_dpn_uses_the_input_gradient():
    dpn = DPN(stage2_dpn.Config(depth=1, width=8))
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)
    recon, image = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    # same recon, an image with the same gradient (constant shift) vs another image
    assert torch.allclose(dpn(recon, image), dpn(recon, image + 0.2), atol=1e-6)
    assert not torch.allclose(dpn(recon, image), dpn(recon, torch.rand(1, 3, 16, 16)), atol=1e-3)


def test_dpn_loss_eq7():
    image = torch.rand(2, 3, 16, 16)
    same = image[:, None].repeat(1, 4, 1, 1, 1)  # (B, N, C, H, W)
    loss, parts = dpn_loss(same, image)
    assert loss == 0 and parts["l1"] == 0 and parts["l1_grad"] == 0
    _, parts = dpn_loss(same + 0.1, image)  # a constant shift: intensity error only
    assert abs(parts["l1"] - 0.1) < 1e-6 and parts["l1_grad"] < 1e-6
    refined = torch.rand(2, 4, 3, 16, 16)
    want = sum((refined[:, n] - image).abs().mean()
               + (image_gradient(refined[:, n]) - image_gradient(image)).abs().mean()
               for n in range(4)) / 4  # the mean over depths of Eq. (7)
    assert torch.allclose(dpn_loss(refined, image)[0], want, atol=1e-6)


def test_dpn_gradients_reach_every_parameter_and_never_the_rcae():
    dpn = DPN(stage2_dpn.Config(depth=3, width=8))
    up = rcae()  # deliberately not frozen: loss_fn's no_grad alone must keep it out of the graph
    x = torch.rand(2, 3, 32, 32)
    loss, parts = stage2_dpn.loss_fn(dpn, {"image": x}, rcae=up)
    loss.backward()
    assert dpn.ae.dec1.weight.grad.abs().sum() > 0  # learning starts from the zero residual
    assert {"l1", "l1_grad", "l1_rcae"} <= set(parts)
    assert all(p.grad is None for p in up.parameters())
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)  # past the first step every parameter learns
    dpn.zero_grad()
    stage2_dpn.loss_fn(dpn, {"image": x}, rcae=up)[0].backward()
    for name, p in dpn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dpn_trains_on_clean_images_only(toy_data, capsys):
    """Stage 2 sees clean normal images only (paper): its batch is the image as it is, and it has no pseudo-anomaly
    flags (stage 1's denoising input and stage 3's pseudo anomalies are theirs alone)."""
    x = torch.rand(4, 3, 32, 32)
    b = stage2_dpn.make_batch(x, torch.Generator().manual_seed(0))
    assert set(b) == {"image"} and torch.equal(b["image"], x)
    for flag, value in (("--anomaly_prob", "0.5"), ("--anomaly_size", "relative"), ("--anomaly_colour", "image")):
        refused_flag(stage2_dpn, ["--data", toy_data, flag, value], flag, capsys)


# ----------------------------------------------------------------------------- stage 3: CRD


@pytest.mark.parametrize("size,depths", [(16, [3]), (20, [1, 3]), (64, [1, 2, 3, 4, 5])])
def test_crd_shapes(size, depths):
    crd = CRD(stage3_crd.Config(depth=5, width=4, use_depths=depths))
    assert crd(torch.randn(2, 6, len(depths), size, size)).shape == (2, 1, size, size)


def test_crd_map_follows_the_image():
    """M_A is local: a change in a 4x4 patch moves the map only near it, and shifting the input by a multiple
    of the 8 px stride shifts the map by as much, away from the zero-padded borders."""
    crd = CRD(stage3_crd.Config(depth=2, width=4))
    x = torch.randn(1, 6, 2, 96, 96)
    with torch.no_grad():
        m = crd.logits(x)
        shifted = crd.logits(torch.roll(x, 16, dims=-1))
        assert torch.allclose(shifted[..., 32:80], torch.roll(m, 16, dims=-1)[..., 32:80], atol=1e-5)
        x2 = x.clone()
        x2[..., 10:14, 10:14] += 5
        changed = ((crd.logits(x2) - m).abs() > 1e-5)[0, 0]  # (H, W)
    assert changed[10:14, 10:14].all() and not changed[48:].any() and not changed[:, 48:].any()


def test_crd_residual_scale_position_divides_the_residual_channels():
    """--residual_scale position: with a scale of 1 CRD is the plain one; with a scale of 2 it sees the residual
    channels halved and the image channels unchanged."""
    torch.manual_seed(0)
    plain = CRD(stage3_crd.Config(depth=2, width=4, image_size=16, crd_input="residual"))
    torch.manual_seed(0)
    normed = CRD(stage3_crd.Config(depth=2, width=4, image_size=16, crd_input="residual", residual_scale="position"))
    assert "position_scale" not in plain.state_dict() and normed.position_scale.shape == (1, 1, 2, 16, 16)
    x = torch.randn(1, 6, 2, 16, 16)
    with torch.no_grad():
        assert torch.allclose(normed.logits(x), plain.logits(x), atol=1e-6)
        normed.position_scale.fill_(2.0)
        halved = torch.cat([x[:, :3] / 2, x[:, 3:]], 1)
        assert torch.allclose(normed.logits(x), plain.logits(halved), atol=1e-6)
        assert not torch.allclose(normed.logits(x), plain.logits(x / 2), atol=1e-4)  # the image is not scaled


def test_position_scale_is_the_normal_residual_relative_to_its_image_mean():
    """A chain whose residual is twice as large in the left half: scale 4/3 there, 2/3 on the right, per depth."""
    class Frozen:  # reconstruct_all / refine: the residual I - I_D^n is 1 on the left half, 0.5 on the right
        depth = 2

        def reconstruct_all(self, x):
            off = torch.full_like(x, 0.5)
            off[..., :8] = 1.0
            return (x - off)[:, None].expand(-1, 2, -1, -1, -1)

        def refine(self, recons, x):
            return recons
    images = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    s = stage3_crd.position_scale(Frozen(), Frozen(), images, [1, 2], batch_size=2)
    assert s.shape == (1, 1, 2, 16, 16)
    assert torch.allclose(s[..., :8], torch.full_like(s[..., :8], 4 / 3))
    assert torch.allclose(s[..., 8:], torch.full_like(s[..., 8:], 2 / 3))


def test_crd_residual_scale_position_end_to_end(toy_data, tmp_path, monkeypatch):
    """Stage 3 with --residual_scale position measures the scale on the training images before step 1, saves it
    with the weights and the detector reads it back; a resumed run keeps the saved scale without measuring it
    again; with the paper's refined input it is a one-line error."""
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=2))
    stage2_dpn.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, max_steps=2))
    with pytest.raises(UserError, match="needs --crd_input residual"):
        stage3_crd.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, width=4, max_steps=2,
                                   residual_scale="position"))  # --crd_input refined, the default
    stage3_crd.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, width=4, max_steps=2,
                               residual_scale="position", crd_input="residual"))
    crd, _ = stage3_crd.load_crd(str(tmp_path / "stage3_crd.pt"))
    s = crd.position_scale  # (1, 1, NR, H, W): 1 on average over each depth's image, not 1 everywhere
    assert s.shape == (1, 1, 3, 64, 64) and torch.allclose(s.mean((-2, -1)), torch.ones(1, 1, 3), atol=0.05)
    assert float(s.std()) > 0.01
    assert stage3_crd.load_detector(str(tmp_path)).crd.position_scale.equal(s)

    def measured_again(*a, **k):
        raise AssertionError("a resumed run measured the scale again")
    monkeypatch.setattr(stage3_crd, "position_scale", measured_again)
    stage3_crd.main(quick_args(toy_data, tmp_path, image_size=None, depth=None, width=4, max_steps=4,
                               residual_scale="position", crd_input="residual"))
    crd, ck = stage3_crd.load_crd(str(tmp_path / "stage3_crd.pt"))
    assert ck["step"] == 4 and crd.position_scale.equal(s)


def test_crd_config_default_uses_every_depth():
    assert stage3_crd.Config(depth=4).use_depths == [1, 2, 3, 4]
    assert CRD(stage3_crd.Config(depth=4, width=4)).head.kernel_size == (4, 1, 1)


def test_crd_gradients_reach_every_parameter_and_every_recursion_step():
    crd = CRD(stage3_crd.Config(depth=3, width=4))
    x = torch.rand(2, 6, 3, 32, 32, requires_grad=True)
    mask = (torch.rand(2, 1, 32, 32) > 0.7).float()
    crd_loss(crd.logits(x), mask)[0].backward()
    for name, p in crd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for n in range(3):  # the map depends on every depth on the recursion axis
        assert x.grad[:, :, n].abs().sum() > 0


def test_crd_loss_is_squared_eq9():
    logit = torch.logit  # crd_loss takes the logits of M_A
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float() * 0.8 + 0.1
    loss, parts = crd_loss(logit(mask), mask)
    assert loss < 1e-10 and parts["l2"] < 1e-10 and parts["mse_grad"] < 1e-10
    loss, parts = crd_loss(logit(mask - 0.05), mask)  # squared: 0.0025, not 0.05; a shift has no gradient error
    assert abs(loss - 0.0025) < 1e-6 and parts["mse_grad"] < 1e-9
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1
    assert crd_loss(torch.zeros_like(edge), edge)[1]["mse_grad"] > 0


def test_crd_loss_kinds_keep_a_gradient_where_l2_saturates():
    """A missed anomalous pixel at logit -10: L2 through the sigmoid gives it almost no gradient, focal does."""
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3:5, 3:5] = 1
    grads = {}
    for kind in ("l2", "focal"):
        logits = torch.full_like(mask, -10.0, requires_grad=True)
        crd_loss(logits, mask, kind)[0].backward()
        grads[kind] = logits.grad[mask > 0].abs().mean().item()
    assert grads["l2"] < 1e-5 and grads["focal"] > 1e-3


def test_crd_residual_input():
    refined, image = torch.rand(2, 3, 3, 8, 8), torch.rand(2, 3, 8, 8)
    x = crd_input(refined, image, [1, 3], "residual")  # (B, 2C, NR, H, W)
    assert torch.equal(x[:, :3, 1], image - refined[:, 2]) and torch.equal(x[:, 3:, 0], image)


def test_crd_learns_to_find_fresh_pseudo_anomalies(toy_data, tmp_path, monkeypatch):
    """A few hundred CPU steps make CRD localise pseudo anomalies of the validation stream (drawn by no
    training stage, on holdout images no stage trained on) far better than chance; with a broken loss
    (blind to the mask) the same check fails."""
    kw = dict(image_size=None, depth=None)
    stage1_rcae.main(quick_args(toy_data, tmp_path, image_size=32, depth=2, max_steps=30, lr=1e-3, holdout=0.25))
    stage2_dpn.main(quick_args(toy_data, tmp_path, max_steps=2, **kw))
    real, val = stage3_crd.crd_loss, {}
    for broken in (True, False):
        if broken:
            monkeypatch.setattr(stage3_crd, "crd_loss", lambda lg, m, k="l2": real(lg, torch.zeros_like(m), k))
        else:
            monkeypatch.setattr(stage3_crd, "crd_loss", real)
        out = tmp_path / f"broken{broken}"
        stage3_crd.main(quick_args(toy_data, out, max_steps=250, lr=1e-3, width=8, batch_size=8, crd_input="residual",
                                   anomaly_prob=1.0, loss="focal", anomaly_size="relative", init_prior=0.01,
                                   rcae=tmp_path / "stage1_rcae.pt", dpn=tmp_path / "stage2_dpn.pt", **kw))
        val[broken] = torch.load(out / "stage3_crd.pt", weights_only=True)["val"]
    assert val[False]["p_auroc"] > 0.8 and val[False]["p_auroc"] > val[True]["p_auroc"] + 0.15, val
    assert val[False]["aupro"] > val[True]["aupro"], val


def test_validation_reports_the_residual_bar_beside_crd():
    """Stage 3's validation scores the rcae+dpn residual |I - I_D^N| on the same pseudo anomalies, so a log
    shows whether CRD beats the map it is meant to improve on."""
    torch.manual_seed(0)
    up, dpn = frozen(rcae()), frozen(DPN(stage2_dpn.Config(depth=3, width=8)))
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)
    crd = CRD(stage3_crd.Config(depth=3, width=4)).eval()
    images, masks = torch.rand(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.9).float()
    val = stage3_crd.validate(crd, up, dpn, (images, masks), batch_size=3)
    with torch.no_grad():
        res = (images - dpn.refine(up.reconstruct_all(images), images)[:, -1]).abs().mean(1)  # (M, H, W)
        crd_map = crd(crd_input(dpn.refine(up.reconstruct_all(images), images), images, [1, 2, 3]))[:, 0]
    assert val["residual_p_auroc"] == pytest.approx(metrics.pixel_auroc(masks[:, 0].numpy(), res.numpy()), abs=1e-6)
    assert val["p_auroc"] == pytest.approx(metrics.pixel_auroc(masks[:, 0].numpy(), crd_map.numpy()), abs=1e-6)
    assert val["residual_p_auroc"] != val["p_auroc"]


def test_detector_runs_crd_in_the_precision_it_was_trained_in(monkeypatch):
    """Stage 3 trains CRD under common.autocast (bf16 upstream outputs on CUDA); the Detector that evaluate.py
    uses must feed it the same. Autocast on the CPU takes the same code path as on CUDA."""
    monkeypatch.setattr(common, "AMP_DEVICE_TYPES", ("cuda", "cpu"))
    torch.manual_seed(0)
    up, dpn, crd = frozen(rcae()), frozen(DPN(stage2_dpn.Config(depth=3, width=8))), CRD(
        stage3_crd.Config(depth=3, width=4)).eval()
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)  # a DPN that does something
    x = torch.rand(2, 3, 32, 32)
    seen = []

    class Spy(torch.nn.Module):  # the trained network as stage 3's loss sees it: record its logits
        def logits(self, inp):
            seen.append(crd.logits(inp))
            return seen[-1]

    maps = {}
    for amp in (1, 0):
        with common.autocast(x.device, amp), torch.no_grad():  # as common.train runs the loss
            stage3_crd.loss_fn(Spy(), {"image": x, "mask": torch.zeros(2, 1, 32, 32)}, up, dpn, [1, 2, 3])
        with torch.no_grad():
            maps[amp] = stage3_crd.Detector(up, dpn, crd, amp=amp)(x)["map"]
        assert maps[amp].dtype == torch.float32
        assert torch.equal(maps[amp], torch.sigmoid(seen[-1].float())), amp  # training's path, bit for bit
    assert not torch.equal(maps[1], maps[0])  # and amp 1 really ran in bf16


def test_crd_input_layout_and_table6_subset():
    refined, image = torch.rand(2, 5, 3, 8, 8), torch.rand(2, 3, 8, 8)
    inp = crd_input(refined, image, [1, 3])
    assert inp.shape == (2, 6, 2, 8, 8)  # (B, 2C, NR, H, W), NR = 2
    assert torch.equal(inp[:, :3, 0], refined[:, 0]) and torch.equal(inp[:, :3, 1], refined[:, 2])
    assert torch.equal(inp[:, 3:, 0], image) and torch.equal(inp[:, 3:, 1], image)
    assert crd_input(refined, image, [1, 2, 3, 4, 5]).shape == (2, 6, 5, 8, 8)


def test_parse_depths():
    assert parse_depths(None, 5) == [1, 2, 3, 4, 5]
    assert parse_depths("1,3,5", 5) == [1, 3, 5]
    assert parse_depths("5, 1", 5) == [1, 5]
    for bad in ("0", "6", "1,1", "a,b", "", "2.5"):
        with pytest.raises(UserError, match="use_depths"):
            parse_depths(bad, 5)


def test_crd_loss_fn_never_reaches_the_upstream():
    up, dpn = rcae(), DPN(stage2_dpn.Config(depth=3, width=8))  # deliberately not frozen
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.1)
    crd = CRD(stage3_crd.Config(depth=3, width=4, use_depths=[1, 3]))
    gen = torch.Generator().manual_seed(0)
    b = stage3_crd.make_batch(torch.rand(3, 3, 32, 32), gen, anomaly_prob=1.0)
    assert b["mask"].sum() > 0
    stage3_crd.loss_fn(crd, b, rcae=up, dpn=dpn, depths=[1, 3])[0].backward()
    assert all(p.grad is None for p in [*up.parameters(), *dpn.parameters()])
    assert all(p.grad is not None for p in crd.parameters())


def test_make_batch_without_anomalies_gives_zero_masks():
    b = stage3_crd.make_batch(torch.rand(4, 3, 32, 32), torch.Generator().manual_seed(0), anomaly_prob=0.0)
    assert b["mask"].shape == (4, 1, 32, 32) and b["mask"].sum() == 0


def test_calibrate_without_holdout_warns(capsys):
    det = stage3_crd.Detector(rcae(), DPN(stage2_dpn.Config(depth=3, width=8)),
                              CRD(stage3_crd.Config(depth=3, width=4)))
    args = SimpleNamespace(batch_size=4, topk_frac=0.01, threshold_quantile=0.99, holdout=0)
    cal = stage3_crd.calibrate(det, torch.zeros(0, 3, 32, 32, dtype=torch.uint8), args)
    assert cal["image_threshold"] is None and cal["holdout_scores"] == []
    assert "holdout" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def chain(toy_data, tmp_path_factory):
    """stage1 -> stage2 -> stage3 for 2 steps each, inheriting image_size/depth; spies on the upstream."""
    out = tmp_path_factory.mktemp("chain")
    with pytest.MonkeyPatch.context() as mp:
        stage1_rcae.main(quick_args(toy_data, out, width=8))
        rcae_seen = spy(mp, stage2_dpn, "load_rcae")
        stage2_dpn.main(quick_args(toy_data, out, image_size=None, depth=None, width=8))
        in_stage2 = rcae_seen[-1][0]
        dpn_seen = spy(mp, stage3_crd, "load_dpn")
        stage3_crd.main(quick_args(toy_data, out, image_size=None, depth=None, width=4))
    return SimpleNamespace(out=out, data=toy_data, rcae_in_stage2=in_stage2, rcae_in_stage3=rcae_seen[-1][0],
                           dpn_in_stage3=dpn_seen[-1][0])


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A second category like toy_data (other seed, other images): for the resume refusals."""
    return synth.make_synthetic_category(tmp_path_factory.mktemp("otherdata") / "toy", size=64, n_train=24,
                                         n_test_good=6, n_test_bad=6, seed=5)


@pytest.fixture(scope="module")
def other_rcae(toy_data, tmp_path_factory):
    """A second stage-1 checkpoint (other seed, other weights) for the mismatch refusals."""
    out = tmp_path_factory.mktemp("other")
    stage1_rcae.main(quick_args(toy_data, out, width=8, seed=1))
    return out / "stage1_rcae.pt"


def test_chain_upstream_frozen_and_bitwise_unchanged(chain):
    assert_untouched(chain.rcae_in_stage2, chain.out / "stage1_rcae.pt")
    assert_untouched(chain.rcae_in_stage3, chain.out / "stage1_rcae.pt")
    assert_untouched(chain.dpn_in_stage3, chain.out / "stage2_dpn.pt")


def test_chain_dpn_checkpoint(chain):
    dpn, ck = stage2_dpn.load_dpn(chain.out / "stage2_dpn.pt")
    assert ck["stage"] == "stage2_dpn" and ck["step"] == 2
    assert ck["model_config"] == {"channels": 3, "depth": 3, "image_size": 64, "width": 8}  # inherited
    assert ck["args"]["depth"] == 3 and ck["args"]["image_size"] == 64 and ck["args"]["holdout"] == 0.1
    assert ck["args"]["rcae"] == str(chain.out / "stage1_rcae.pt")
    rcae_ck = torch.load(chain.out / "stage1_rcae.pt", weights_only=True)
    assert ck["upstream"]["rcae_sha"] == common.fingerprint(rcae_ck["model"])
    assert not dpn.training and not any(p.requires_grad for p in dpn.parameters())
    assert any(v.abs().sum() > 0 for v in dpn.ae.dec1.state_dict().values())  # it trained off zero


def test_chain_crd_checkpoint_and_detector(chain):
    crd, ck = stage3_crd.load_crd(chain.out / "stage3_crd.pt")
    assert ck["stage"] == "stage3_crd" and ck["step"] == 2
    assert ck["model_config"] == {"channels": 3, "depth": 3, "image_size": 64, "width": 4, "use_depths": [1, 2, 3],
                                  "crd_input": "refined", "residual_scale": "none"}  # the defaults: Eq. (8)
    # what common.train saved survives the calibration rewrite
    assert ck["total_steps"] == 2 and set(ck["upstream"]) == {"rcae", "rcae_sha", "dpn", "dpn_sha"}
    det = stage3_crd.load_detector(chain.out)
    assert not any(p.requires_grad for p in det.parameters())
    x = common.to_float(evaluate.load_test(chain.data, 64).images[:3])
    out = det.predict(x)
    assert out["recons"].shape == out["refined"].shape == (3, 3, 3, 64, 64)
    assert out["map"].shape == (3, 1, 64, 64) and 0 <= out["map"].min() and out["map"].max() <= 1
    assert out["score"].shape == (3,) and torch.is_inference(out["map"])
    assert torch.allclose(out["recons"], det.rcae.reconstruct_all(x))


def test_chain_calibration_is_on_the_holdout(chain):
    _, ck = stage3_crd.load_crd(chain.out / "stage3_crd.pt")
    cal = ck["calibration"]
    assert cal["topk_frac"] == 0.01 and cal["quantile"] == 0.99
    holdout = common.train_images(SimpleNamespace(data=chain.data, image_size=64, resize="squash", holdout=0.1),
                                  "holdout")
    assert len(cal["holdout_scores"]) == len(holdout) > 0
    det = stage3_crd.load_detector(chain.out)
    scores = det.predict(common.to_float(holdout))["score"]
    assert torch.allclose(scores, torch.tensor(cal["holdout_scores"]), atol=1e-5)
    assert abs(cal["image_threshold"] - torch.quantile(scores, 0.99).item()) < 1e-5
    assert det.image_threshold == cal["image_threshold"]


def test_table6_subset_of_depths(chain, tmp_path):
    out = tmp_path / "nr2"
    stage3_crd.main(quick_args(chain.data, out, image_size=None, depth=None, width=4, use_depths="3,1",
                               rcae=chain.out / "stage1_rcae.pt", dpn=chain.out / "stage2_dpn.pt"))
    crd, ck = stage3_crd.load_crd(out / "stage3_crd.pt")
    assert ck["model_config"]["use_depths"] == [1, 3] and crd.head.kernel_size == (2, 1, 1)
    det = stage3_crd.load_detector(out, rcae=chain.out / "stage1_rcae.pt", dpn=chain.out / "stage2_dpn.pt")
    assert det(torch.rand(1, 3, 64, 64))["map"].shape == (1, 1, 64, 64)
    with pytest.raises(UserError, match="1..3"):
        stage3_crd.main(quick_args(chain.data, tmp_path / "bad", image_size=None, depth=None, use_depths="1,4",
                                   rcae=chain.out / "stage1_rcae.pt", dpn=chain.out / "stage2_dpn.pt"))


# ----------------------------------------------------------------------------- refusals


def test_missing_stage1_names_the_stage1_command(toy_data, tmp_path):
    with pytest.raises(UserError, match="python stage1_rcae.py"):
        stage2_dpn.main(quick_args(toy_data, tmp_path, image_size=None, depth=None))
    with pytest.raises(UserError, match="python stage1_rcae.py"):
        stage3_crd.main(quick_args(toy_data, tmp_path, image_size=None, depth=None))


def test_missing_stage2_names_the_stage2_command(chain, tmp_path):
    with pytest.raises(UserError, match="python stage2_dpn.py"):
        stage3_crd.main(quick_args(chain.data, tmp_path, image_size=None, depth=None,
                                   rcae=chain.out / "stage1_rcae.pt"))


def test_wrong_stage_checkpoint_is_refused(chain, tmp_path):
    with pytest.raises(UserError, match="'stage2_dpn' checkpoint, expected 'stage1_rcae'"):
        stage2_dpn.main(quick_args(chain.data, tmp_path, image_size=None, depth=None,
                                   rcae=chain.out / "stage2_dpn.pt"))
    with pytest.raises(UserError, match="expected 'stage2_dpn'"):
        stage3_crd.main(quick_args(chain.data, tmp_path, image_size=None, depth=None,
                                   rcae=chain.out / "stage1_rcae.pt", dpn=chain.out / "stage3_crd.pt"))


@pytest.mark.parametrize("flag", [{"image_size": 32}, {"depth": 2}, {"holdout": 0.2}, {"resize": "pad"},
                                  {"train_fraction": 0.5}, {"ema": 0.5}])
def test_stage1_only_flags_are_not_flags_of_stages_2_3(toy_data, tmp_path, flag, capsys):
    """Image size, depth, holdout, resize and train fraction come from the stage-1 checkpoint only (no flag could
    disagree with it), and --ema is stage 1's."""
    name = next(iter(flag))
    for module in (stage2_dpn, stage3_crd):
        refused_flag(module, quick_args(toy_data, tmp_path, **{"image_size": None, "depth": None, **flag}),
                     f"--{name}", capsys)


def test_upstream_rcae_takes_the_inherited_settings_from_the_checkpoint(chain, tmp_path):
    args = stage2_dpn.get_args(quick_args(chain.data, tmp_path, image_size=None, depth=None,
                                          rcae=chain.out / "stage1_rcae.pt"))
    assert not any(hasattr(args, k) for k in common.INHERITED)
    stage2_dpn.upstream_rcae(args)
    rcae_args = torch.load(chain.out / "stage1_rcae.pt", weights_only=True)["args"]
    assert {k: getattr(args, k) for k in common.INHERITED} == {k: rcae_args[k] for k in common.INHERITED}
    assert (args.image_size, args.depth, args.holdout, args.resize, args.train_fraction) == (64, 3, 0.1, "squash", 1.0)


def test_dpn_from_another_rcae_is_refused(chain, other_rcae, tmp_path):
    with pytest.raises(UserError, match="trained on the RcAE"):
        stage3_crd.main(quick_args(chain.data, tmp_path, image_size=None, depth=None, rcae=other_rcae,
                                   dpn=chain.out / "stage2_dpn.pt"))
    with pytest.raises(UserError, match="trained on the RcAE .*--rcae"):
        stage3_crd.load_detector(chain.out, rcae=other_rcae)


def test_retrained_upstream_is_not_resumed(chain, other_rcae, tmp_path):
    """A run continued on other upstream weights is refused, its checkpoint left as it was: stage 2 after stage 1
    was retrained, stage 3 after stage 2 was (on the same RcAE, so the chain itself is consistent)."""
    out = tmp_path / "copy"
    shutil.copytree(chain.out, out)
    shutil.copy(other_rcae, out / "stage1_rcae.pt")  # stage 1 was retrained since stage 2 ran
    before = (out / "stage2_dpn.pt").read_bytes()
    with pytest.raises(UserError, match=r"other upstream weights \(rcae_sha differ.*--overwrite"):
        stage2_dpn.main(quick_args(chain.data, out, image_size=None, depth=None, width=8, max_steps=4))
    assert (out / "stage2_dpn.pt").read_bytes() == before
    shutil.copy(chain.out / "stage1_rcae.pt", out / "stage1_rcae.pt")
    stage2_dpn.main(quick_args(chain.data, out, image_size=None, depth=None, width=8, seed=1, overwrite=True))
    before = (out / "stage3_crd.pt").read_bytes()
    with pytest.raises(UserError, match=r"other upstream weights \(dpn_sha differ.*--overwrite"):
        stage3_crd.main(quick_args(chain.data, out, image_size=None, depth=None, width=4, max_steps=4))
    assert (out / "stage3_crd.pt").read_bytes() == before


def test_stages_2_3_refuse_to_resume_on_other_images(chain, other_data, tmp_path):
    """As stage 1 (test_stage1.py): a finished stage 2 or 3 asked to go on with --data that gives other training
    images is refused, not reported "already trained", and its checkpoint is left as it was."""
    out = tmp_path / "copy"
    shutil.copytree(chain.out, out)
    for module, width in ((stage2_dpn, 8), (stage3_crd, 4)):
        path = out / f"{module.STAGE}.pt"
        before = path.read_bytes()
        with pytest.raises(UserError, match="trained on other images than --data .*--overwrite"):
            module.main(quick_args(other_data, out, image_size=None, depth=None, width=width))
        assert path.read_bytes() == before


def test_stages_2_3_inherit_the_data_settings_of_stage1(toy_data, tmp_path):
    """Stages 2 and 3 train on stage 1's very images (its size, resize, holdout and subset of train/good, Table 5)
    and at its depth, and calibrate on its holdout."""
    inherited = dict(image_size=32, depth=2, holdout=0.25, resize="pad", train_fraction=0.5)
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1, width=8, **inherited))
    stage2_dpn.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None, width=8))
    stage3_crd.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None, width=4))
    cks = [torch.load(tmp_path / f"{s}.pt", weights_only=True) for s in ("stage1_rcae", "stage2_dpn", "stage3_crd")]
    for ck in cks:
        assert {k: ck["args"][k] for k in common.INHERITED} == inherited, ck["stage"]
        assert (ck["model_config"]["image_size"], ck["model_config"]["depth"]) == (32, 2), ck["stage"]
        assert ck["data_sha"] == cks[0]["data_sha"], ck["stage"]  # the same training images
    assert len(cks[2]["calibration"]["holdout_scores"]) == round(24 * 0.25)


def test_convae_checkpoint_runs_through_stages_2_3_and_evaluate(toy_data, tmp_path):
    """A single-pass ConvAE (--arch convae --share 0 --skip 0) describes itself: stages 2-3 and evaluate.py
    rebuild it from the checkpoint and run unchanged, its one output standing for every depth."""
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=32, arch="convae", share=0, skip=0))
    stage2_dpn.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None))
    stage3_crd.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None))
    detector = stage3_crd.load_detector(tmp_path)
    assert detector.rcae.cfg.arch == "convae" and len(detector.rcae.E) == 3
    evaluate.main(["--data", toy_data, "--out", str(tmp_path), "--device", "cpu", "--n_figures", "1"])
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert set(result["variants"]) == {"rcae", "rcae+dpn", "crd"}


def test_anomaly_flags_reach_the_pseudo_anomalies_of_stages_1_and_3(toy_data, tmp_path, monkeypatch):
    """--anomaly_size and --anomaly_colour are what stage 1's batches, stage 3's batches and stage 3's validation
    set are drawn with; stage 2 draws none."""
    seen, real = [], common.pseudo_anomaly

    def record(img, gen, size_mode="scaled", colours="uniform", **k):
        seen.append((size_mode, colours))
        return real(img, gen, size_mode, colours, **k)

    monkeypatch.setattr(common, "pseudo_anomaly", record)
    flags = dict(anomaly_size="relative", anomaly_colour="image", anomaly_prob=1.0)
    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1, **flags))
    assert seen and set(seen) == {("relative", "image")}
    seen.clear()
    stage2_dpn.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None))
    assert seen == []  # clean images only
    stage3_crd.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None, width=4, **flags))
    assert len(seen) > 4 and set(seen) == {("relative", "image")}  # the training batch and the validation images


def test_init_prior_starts_the_map_at_the_prior(toy_data, tmp_path, monkeypatch):
    """--init_prior p sets CRD's head bias to logit(p) before training: M_A starts near p, not 0.5."""
    seen = {}
    real = stage3_crd.crd_loss

    def first(logits, mask, kind="l2"):
        seen.setdefault("map", torch.sigmoid(logits.detach()).mean().item())
        return real(logits, mask, kind)

    stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    stage2_dpn.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None))
    monkeypatch.setattr(stage3_crd, "crd_loss", first)
    stage3_crd.main(quick_args(toy_data, tmp_path, max_steps=1, image_size=None, depth=None, width=4,
                               init_prior=0.01, lr=1e-12))
    assert abs(seen["map"] - 0.01) < 0.01
    with pytest.raises(UserError, match="--init_prior must be in"):
        stage3_crd.get_args(quick_args(toy_data, tmp_path, image_size=None, depth=None, init_prior=1.5))
