"""FAIR baseline (baselines/fair.py): filters against numpy, scoring, colour space, model, augmentation, a run."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

import common
from baselines import fair
from conftest import quick_args


def _image(size=64, seed=0):
    """A known RGB test image: smooth shading + a bright square + noise, (1, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = 0.3 + 0.2 * (xx / size)[None] * torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    img[:, size // 4:size // 2, size // 3:2 * size // 3] += 0.4
    return (img + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)[None]


def _numpy_highpass(img, kind, d0, order):
    """Reference: numpy FFT of the ITU-R 601 luma, centred, H of Eq. (2)-(4), inverse FFT, real part."""
    rgb = img[0].numpy().astype(np.float64)
    g = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    m, n = g.shape
    u, v = np.meshgrid(np.arange(m) - m / 2, np.arange(n) - n / 2, indexing="ij")
    d = np.sqrt(u ** 2 + v ** 2)
    with np.errstate(divide="ignore"):
        h = {"ideal": (d > d0).astype(float),
             "gaussian": 1 - np.exp(-d ** 2 / (2 * d0 ** 2)),
             "butterworth": np.where(d == 0, 0.0, 1 / (1 + (d0 / np.where(d == 0, 1, d)) ** (2 * order)))}[kind]
    spec = np.fft.fftshift(np.fft.fft2(g)) * h
    return np.real(np.fft.ifft2(np.fft.ifftshift(spec))), h


@pytest.mark.parametrize("kind", ["butterworth", "ideal", "gaussian"])
def test_highpass_matches_numpy(kind):
    img = _image(64)
    out = fair.high_frequency(img, kind, d0=30.0, order=2)  # d0 scaled to 30 * 64 / 256 = 7.5
    ref, h_ref = _numpy_highpass(img, kind, 7.5, 2)
    assert out.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=2e-5)
    assert abs(float(out.mean())) < 1e-5  # H = 0 at the centre: DC removed
    assert float(fair.luma(img).mean()) > 0.3  # ... from an image whose mean is far from 0
    h = fair.transfer_function(kind, 64, 64, 7.5, 2)
    np.testing.assert_allclose(h.numpy(), h_ref, atol=1e-6)


def test_transfer_function_values():
    m = n = 64
    d0, c = 7.5, 32  # centre (M/2, N/2) = (32, 32)
    bw = fair.transfer_function("butterworth", m, n, d0, 2)
    assert float(bw[c, c]) == 0.0
    assert float(bw[c, c + 15]) == pytest.approx(1 / (1 + (7.5 / 15) ** 4), abs=1e-6)  # D = 15
    assert float(bw[c + 3, c + 4]) == pytest.approx(1 / (1 + (7.5 / 5) ** 4), abs=1e-6)  # D = 5
    bw3 = fair.transfer_function("butterworth", m, n, 5.0, 3)
    assert float(bw3[c + 3, c + 4]) == pytest.approx(0.5, abs=1e-6)  # D = D0 -> 1/2 for any order
    ga = fair.transfer_function("gaussian", m, n, d0, 2)
    assert float(ga[c, c]) == 0.0
    assert float(ga[c, c + 15]) == pytest.approx(1 - math.exp(-15 ** 2 / (2 * 7.5 ** 2)), abs=1e-6)
    ideal = fair.transfer_function("ideal", m, n, 5.0, 2)
    assert float(ideal[c + 3, c + 4]) == 0.0  # D = D0 -> 0 (Eq. (2): D <= D0)
    assert float(ideal[c, c + 6]) == 1.0 and float(ideal[c, c + 4]) == 0.0
    assert float(ideal[0, 0]) == 1.0  # corners are the highest frequencies
    with pytest.raises(ValueError):
        fair.transfer_function("box", m, n, d0, 2)


def test_sobel_variant():
    img = _image(32)
    out = fair.high_frequency(img, "sobel")
    assert out.shape == (1, 2, 32, 32)
    g = fair.luma(img)[0, 0].double().numpy()
    np.testing.assert_allclose(out[0, 0].numpy(), scipy.ndimage.sobel(g, axis=1, mode="mirror"), atol=1e-5)
    np.testing.assert_allclose(out[0, 1].numpy(), scipy.ndimage.sobel(g, axis=0, mode="mirror"), atol=1e-5)
    model = fair.FAIR(fair.Config(base=4, in_channels=2, filter="sobel"))
    assert model(img).shape == (1, 3, 32, 32)


def test_msgms_zero_for_identical_and_local_for_an_edit():
    x = _image(64).repeat(2, 1, 1, 1)
    a = fair.gradient_anomaly(x, x.clone())
    assert a.shape == (2, 1, 64, 64)
    assert float(a.abs().max()) < 1e-5
    r = x.clone()
    r[1, :, 40:50, 40:50] = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0))
    a = fair.gradient_anomaly(x, r)
    assert float(a[1, 0, 40:50, 40:50].mean()) > 0.1  # the edited patch
    assert float(a[1, 0, :25, :25].abs().max()) < 1e-5  # far away
    assert float(a[0].abs().max()) < 1e-5  # the unedited image of the batch
    maps, scores = fair.anomaly_map(x, r)
    assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,)
    assert float(scores[1]) > 0.01 > float(scores[0])
    assert float(maps[1, 0, 45, 45]) == pytest.approx(float(scores[1]), rel=0.5)  # peak near the edit


def test_mean_filter_scales_with_the_image_like_d0():
    assert [fair.mean_filter_side(21, s, s) for s in (64, 128, 256, 512)] == [5, 11, 21, 41]
    x, r = _image(128), _image(128, seed=1)
    a = 3e-4 * fair.color_anomaly(x, r) + fair.gradient_anomaly(x, r)
    expected = torch.nn.functional.avg_pool2d(a, 11, stride=1, padding=5, count_include_pad=True)  # 21 x 128/256
    assert torch.allclose(fair.anomaly_map(x, r)[0], expected)


@pytest.mark.parametrize("rgb,lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
])
def test_cielab_known_colours(rgb, lab):
    out = fair.rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1))[0, :, 0, 0]
    np.testing.assert_allclose(out.numpy(), lab, atol=0.05)


def test_color_anomaly_ignores_lightness():
    x = torch.full((1, 3, 4, 4), 0.5)
    assert float(fair.color_anomaly(x, x * 0.5).max()) < 1e-6  # gray stays gray: a = b = 0
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert float(fair.color_anomaly(x, red).min()) == pytest.approx(80.09 ** 2 + 67.20 ** 2, rel=1e-3)


def test_unet_shapes_gradients_and_size():
    torch.manual_seed(0)
    model = fair.FAIR(fair.Config(base=8))
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.device("meta"):
        big = fair.UNet(1, 3, 128)
    n = common.n_params(big)
    assert 68e6 < n < 70e6  # the published code's UNet: about 69 M at c = 128


def test_ssim_loss():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    total, parts = fair.fair_loss(x, x.clone())
    assert float(total) == pytest.approx(0, abs=1e-5) and set(parts) == {"l2", "ssim"}
    noisy = (x + 0.1 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    total, parts = fair.fair_loss(noisy, x)
    assert 0 < float(parts["ssim"]) < 1 and float(total) == pytest.approx(float(parts["l2"] + parts["ssim"]))
    assert float(fair.ssim(x, 1 - x)) < 0


def test_lr_schedule():
    assert [fair.lr_factor(s, 100) for s in (1, 80, 81, 90, 91, 100)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])


def test_augmentation_reproducible_and_changes_the_image():
    x = common.to_float(torch.stack([(_image(64, s)[0] * 255).to(torch.uint8) for s in range(4)]))
    textures = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    a = fair.corrupt(x, torch.Generator().manual_seed(3), textures, cutpaste_prob=0.5, perlin_prob=1.0)
    b = fair.corrupt(x, torch.Generator().manual_seed(3), textures, cutpaste_prob=0.5, perlin_prob=1.0)
    c = fair.corrupt(x, torch.Generator().manual_seed(4), textures, cutpaste_prob=0.5, perlin_prob=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert (a != x).any(1).flatten(1).any(1).sum() >= 3  # most images changed (an empty Perlin mask is allowed)
    clean = fair.corrupt(x, torch.Generator().manual_seed(3), textures, cutpaste_prob=0.0, perlin_prob=0.0)
    assert torch.equal(clean, x)
    img = x[0]
    for s in range(5):  # large CutPaste: a patch over >= 50% of the image moved elsewhere
        out = fair.large_cutpaste(img, torch.Generator().manual_seed(s))
        assert (out != img).any(0).float().mean() > 0.1
    m = fair.perlin_mask(64, 64, torch.Generator().manual_seed(0))
    assert m.shape == (64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    noise = fair.perlin_noise(64, 64, 4, 4, torch.Generator().manual_seed(0))
    assert noise.abs().max() <= 1.5 and noise.std() > 0.1
    assert float(noise[0, 0]) == pytest.approx(0, abs=1e-6) and float(noise[16, 32]) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("flag", [dict(depth=3), dict(depth=None, recipe="cpu")])
def test_depth_and_recipe_flags_refused(toy_data, tmp_path, flag):
    with pytest.raises(SystemExit):  # FAIR has no recursion and no RcAE recipe: argparse knows no --depth, --recipe
        fair.get_args(quick_args(toy_data, str(tmp_path), **flag))


def test_short_run_reloads_and_scores(toy_data, tmp_path):
    out = tmp_path / "run"
    fair.main(quick_args(toy_data, str(out), depth=None, base=8, smooth=5))
    ck_path = out / "fair.pt"
    assert ck_path.is_file()
    model, ck = fair.load_fair(ck_path)
    assert ck["stage"] == "fair" and ck["step"] == 2
    assert ck["model_config"]["base"] == 8 and ck["model_config"]["filter"] == "butterworth"
    assert ck["model_config"]["in_channels"] == 1 and ck["args"]["smooth"] == 5
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    sd = model.state_dict()
    assert set(sd) == set(ck["model"]) and all(torch.equal(sd[k], ck["model"][k]) for k in sd)
    fresh = fair.FAIR(fair.Config(base=8)).state_dict()
    assert any(not torch.equal(fresh[k], sd[k]) for k in sd if sd[k].is_floating_point())  # it trained
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps, scores = fair.fair_maps(model, ck, x)
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,) and maps.dtype == torch.float32
    assert torch.allclose(scores, maps.flatten(1).amax(1)) and torch.isfinite(maps).all()
    model2, _ = fair.load_fair(ck_path)
    assert torch.equal(fair.fair_maps(model2, ck, x)[0], maps)


def test_short_run_sobel(toy_data, tmp_path):
    out = tmp_path / "sobel"
    fair.main(quick_args(toy_data, str(out), depth=None, base=4, filter="sobel", max_steps=1))
    model, ck = fair.load_fair(out / "fair.pt")
    assert ck["model_config"]["in_channels"] == 2
    maps, scores = fair.fair_maps(model, ck, torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, 1, 64, 64) and scores.shape == (1,)
