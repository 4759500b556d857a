"""FAIR baseline: "Frequency-aware Image Restoration for Industrial Visual Anomaly Detection" (Sec. 3.1-3.4,
4.3, 5.3-5.6 of that paper; docs/reading_the_paper.md).

A UNet restores the RGB image from the high-frequency part of its grayscale version; anomalies, whose
low frequencies the network cannot infer from normal data, are restored badly and show up in a
perceptual comparison of image and restoration.

    corrupt     I' = I with Perlin-shaped texture anomalies or a large CutPaste (Sec. 3.1, "noDTD" of 5.6)
    high-pass   I'_h = Re IFFT( fftshift(FFT(gray(I'))) * H ),  H of Eq. (2)-(4)         Eq. (1), (5), (6)
                or the 3x3 Sobel g_x, g_y of gray(I') (FAIR_xy3, Sec. 5.4), 2 input channels
    restore     I^r = UNet(I'_h), trained with l2(I, I^r) + (1 - SSIM(I, I^r))              Eq. (7)
    score       A = mean21x21(k * A_color + A_gradient), image score = max A              Eq. (8)-(10)

Paper vs published code vs this file:
- Training anomalies. Paper: DRAEM's Perlin-shaped anomalies textured from DTD, plus large CutPaste
  (>50% of the image), proportions not given. Published code: also NSA (Poisson-blended) anomalies,
  CutPaste 20% of the time. Here: the paper's "noDTD" variant (Sec. 5.6), textures from another random
  training image of the category (random rot90/flip; --textures DIR uses a texture folder such as DTD
  instead); no NSA (it is not in the paper); CutPaste on --cutpaste_prob = 0.2 of the images (the code's
  rate, the paper gives none); the others get a Perlin anomaly with DRAEM's probability 0.5.
  Sec. 5.6 says "the internal texture of each training image": we read it as the category's images.
- High-pass: as the code, on the ITU-R 601 luma, fftshift-centred spectrum, D(u, v) measured from
  (M/2, N/2), Butterworth order n = 2 (H = 1 / (1 + (D0/D)^4)), H(centre) = 0. D0 = 30 is given for
  256x256 input; here D0 scales with the image side, D0 * sqrt(M N) / 256, so the cutoff stays at the
  same fraction of the spectrum at other sizes. torch.fft instead of numpy's FFT (same result).
- UNet: as the code, base width c = 128, encoder c, 2c, 4c, 8c, 8c (two 3x3 conv + BatchNorm + ReLU per
  block, max-pool between), bilinear upsampling, additive skips, 1 input channel (2 for Sobel), 3 output
  channels, no output activation: 69.0 M parameters at c = 128.
- Loss Eq. (7): MSE + (1 - SSIM), SSIM with an 11x11 Gaussian window (sigma 1.5), as in the code
  (data range fixed to 1 here; the code guesses it from the batch).
- Learning rate: paper and code multiply it by 0.2 at 80% and 90% of training (`lr_factor`).
- Score: paper Eq. (8)-(10) and code agree: MSGMS over 2 scales (full and 1/2, average-pooled, upsampled
  bilinearly), Prewitt kernels, c = 0.0026, on the luma (RIAD's code takes the channel mean); A_color =
  da^2 + db^2 in CIELAB (sRGB, D65) with k = 3e-4; 21x21 mean filter with zero padding, given for 256 px
  input and here scaled with the image side as D0 is (mean_filter_side: 11 at 128 px); image score =
  max of the map. The restoration is clipped to [0, 1] before scoring.

GPU (paper settings):  python -m baselines.fair --data mvtec/bottle
CPU smoke run:         python -m baselines.fair --data data/toy --image_size 64 --base 8 --max_steps 20
Reads:  <data>/train/good (MVTec AD) or the VisA train split; --textures DIR if given.
Writes: <out>/fair.pt (and fair.log.jsonl); <out> defaults to runs/<parent>/<category>.
"""
import argparse
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

STAGE = "fair"
FILTERS = ("butterworth", "ideal", "gaussian", "sobel")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    # paper Sec. 4.3: 800 epochs (MVTec AD; VisA: 400), 256 px, batch 8
    common.add_shared_args(p, recipes=False, paper="FAIR paper", epochs=800, image_size=256, batch=8)
    g = p.add_argument_group("model (FAIR)")
    g.add_argument("--base", type=int, default=128, help="UNet base width c (paper Sec. 4.3: 128)")
    g.add_argument("--filter", choices=FILTERS, default="butterworth",
                   help="high-frequency extractor: Eq. (4) Butterworth (paper), Eq. (2) ideal, Eq. (3) Gaussian, "
                        "or 3x3 Sobel g_x, g_y (FAIR_xy3, Sec. 5.4)")
    g.add_argument("--d0", type=float, default=30.0,
                   help="cutoff frequency D0 at 256x256 (paper: 30), scaled with the image side")
    g.add_argument("--order", type=int, default=2, help="Butterworth order n of Eq. (4) (paper: 2)")
    g = p.add_argument_group("augmentation (FAIR, Sec. 3.1 / 5.6 noDTD)")
    g.add_argument("--cutpaste_prob", type=float, default=0.2,
                   help="chance of a large CutPaste (>50%% of the image) per image (paper: not given; code: 0.2)")
    g.add_argument("--perlin_prob", type=float, default=0.5,
                   help="chance of a Perlin-shaped texture anomaly for the other images (DRAEM: 0.5)")
    g.add_argument("--textures", default=None,
                   help="folder of texture images (e.g. DTD) for the Perlin anomalies (paper); "
                        "default: the category's own training images (paper's noDTD)")
    g = p.add_argument_group("scoring (FAIR, Eq. (8)-(10))")
    g.add_argument("--k_color", type=float, default=3e-4, help="weight k of A_color in Eq. (10) (paper: 3e-4)")
    g.add_argument("--smooth", type=int, default=21,
                   help="side of the mean filter f_mean of Eq. (10) at 256x256 (paper: 21), scaled with the image "
                        "side like --d0")
    args = common.parse_args(p, argv)
    common.check_flags(args, base=">=1", d0=">0", order=">=1", cutpaste_prob="[0,1]", perlin_prob="[0,1]",
                       k_color=">=0", smooth="odd")
    return args


# ----------------------------------------------------------------------------- high-frequency extraction


def luma(x):
    """ITU-R BT.601 grayscale: (B, 3, H, W) -> (B, 1, H, W); a 1-channel input passes through."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, H, W)


@lru_cache(maxsize=16)
def transfer_function(kind, m, n, d0, order, device="cpu"):
    """H(u, v) of Eq. (2)-(4) on the centred (fftshift-ed) M x N spectrum; d0 in frequency samples.

    D(u, v) = sqrt((u - M/2)^2 + (v - N/2)^2). Cached per size and device (computed once)."""
    u = torch.arange(m, dtype=torch.float64)[:, None] - m / 2  # (M, 1)
    v = torch.arange(n, dtype=torch.float64)[None, :] - n / 2  # (1, N)
    d2 = u ** 2 + v ** 2  # D^2, (M, N)
    if kind == "ideal":
        h = (d2 > d0 ** 2).double()  # Eq. (2)
    elif kind == "gaussian":
        h = 1 - torch.exp(-d2 / (2 * d0 ** 2))  # Eq. (3)
    elif kind == "butterworth":
        h = d2 ** order / (d2 ** order + d0 ** (2 * order))  # Eq. (4) = 1 / (1 + (D0/D)^2n), 0 at D = 0
    else:
        raise ValueError(f"unknown frequency filter {kind!r}")
    return h.float().to(device)  # (M, N)


def sobel(g):
    """3x3 Sobel g_x, g_y of a grayscale image (Sec. 5.4, FAIR_xy3), mirrored border (as cv2.Sobel).

    (B, 1, H, W) -> (B, 2, H, W)."""
    kx = g.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    k = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    return F.conv2d(F.pad(g, (1, 1, 1, 1), mode="reflect"), k)  # (B, 2, H, W)


def high_frequency(x, kind="butterworth", d0=30.0, order=2):
    """The network input I'_h of Eq. (6) from an RGB image x (B, 3, H, W) in [0, 1].

    Frequency filters -> (B, 1, H, W); 'sobel' -> (B, 2, H, W). d0 is the cutoff at 256x256 and is
    scaled to the input size."""
    g = luma(x.float())  # (B, 1, H, W)
    if kind == "sobel":
        return sobel(g)
    m, n = g.shape[-2:]
    h = transfer_function(kind, m, n, d0 * math.sqrt(m * n) / 256, order, g.device)  # (M, N)
    spec = torch.fft.fftshift(torch.fft.fft2(g), dim=(-2, -1))  # Eq. (1), centred, (B, 1, M, N) complex
    spec = spec * h  # Eq. (5)
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real  # Eq. (6), (B, 1, H, W)


# ----------------------------------------------------------------------------- model


@dataclass
class Config:
    base: int = 128  # UNet base width c (paper: 128)
    in_channels: int = 1  # 1 for the frequency filters, 2 for Sobel g_x, g_y
    out_channels: int = 3  # the restored RGB image
    filter: str = "butterworth"  # high-frequency extractor (Eq. (2)-(4) or Sobel)
    d0: float = 30.0  # cutoff at 256x256, scaled with the input size
    order: int = 2  # Butterworth order n
    image_size: int = 256  # training size


def block(cin, cout, mid=None):
    """Two 3x3 conv + BatchNorm + ReLU: cin -> mid -> cout (mid defaults to cout)."""
    mid = mid or cout
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Bilinear x2 upsampling (to the skip's size, so any H, W works), then 3x3 conv + BatchNorm + ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class UNet(nn.Module):
    """The vanilla UNet of the published code: widths c, 2c, 4c, 8c, 8c, additive skips.

    (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin, cout, c):
        super().__init__()
        self.enc = nn.ModuleList([block(cin, c), block(c, 2 * c), block(2 * c, 4 * c), block(4 * c, 8 * c),
                                  block(8 * c, 8 * c)])
        self.up = nn.ModuleList([Up(8 * c), Up(4 * c), Up(2 * c), Up(c)])  # keep the width
        # each decoder block halves the width in its second conv, the last keeps c
        self.dec = nn.ModuleList([block(8 * c, 4 * c, 8 * c), block(4 * c, 2 * c, 4 * c), block(2 * c, c, 2 * c),
                                  block(c, c)])
        self.out = nn.Conv2d(c, cout, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(F.max_pool2d(x, 2) if i else x)  # (B, c 2^i, H/2^i, W/2^i), last (B, 8c, H/16, W/16)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(up(x, skip.shape[-2:]) + skip)  # additive skip, (B, width of the next level down, ...)
        return self.out(x)  # (B, cout, H, W)


class FAIR(nn.Module):
    """High-frequency extraction (fixed) + UNet restoration: RGB (B, 3, H, W) in [0, 1] -> I^r (B, 3, H, W)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.in_channels, cfg.out_channels, cfg.base)

    def highpass(self, x):
        return high_frequency(x, self.cfg.filter, self.cfg.d0, self.cfg.order)  # (B, 1 or 2, H, W)

    def forward(self, x):
        return self.unet(self.highpass(x))  # (B, 3, H, W)


# ----------------------------------------------------------------------------- training anomalies


def perlin_noise(h, w, res_y, res_x, gen):
    """2D Perlin noise on an h x w grid with res_y x res_x lattice cells (DRAEM's generator), in about [-1, 1]."""
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=gen)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)  # (res_y + 1, res_x + 1, 2)
    py = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) * res_y / h  # (H, W) lattice coords
    px = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) * res_x / w
    iy, ix = py.long(), px.long()  # cell of each pixel
    fy, fx = py - iy, px - ix  # position inside the cell, [0, 1)

    def dot(dy, dx):  # gradient at corner (iy + dy, ix + dx) . offset from that corner
        g = grads[iy + dy, ix + dx]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731  Perlin's quintic
    ty, tx = fade(fy), fade(fx)
    top = torch.lerp(dot(0, 0), dot(0, 1), tx)
    bottom = torch.lerp(dot(1, 0), dot(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)  # (H, W)


def perlin_mask(h, w, gen, threshold=0.5, max_log2_res=5):
    """DRAEM's anomaly shape: Perlin noise with lattice 2^[0..5] per axis, rotated by -90..90 degrees,
    thresholded at 0.5. Returns (H, W) float {0, 1}."""
    res_y, res_x = (2 ** int(torch.randint(0, max_log2_res + 1, (1,), generator=gen)) for _ in range(2))
    noise = perlin_noise(h, w, res_y, res_x, gen)[None, None]  # (1, 1, H, W)
    a = math.radians(-90 + 180 * float(torch.rand(1, generator=gen)))
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])[None]
    grid = F.affine_grid(theta, (1, 1, h, w), align_corners=False)
    noise = F.grid_sample(noise, grid, align_corners=False)[0, 0]  # (H, W), zero outside (as imgaug's rotate)
    return (noise > threshold).float()


def perlin_anomaly(img, texture, gen):
    """DRAEM's local anomaly: a Perlin-shaped region of `texture` blended into img (Sec. 3.1).

    img, texture: (C, H, W) in [0, 1] -> (C, H, W); I' = I (1 - M) + (1 - beta) T M + beta I M, beta in [0, 0.8)."""
    _, h, w = img.shape
    m = perlin_mask(h, w, gen)[None]  # (1, H, W)
    beta = 0.8 * float(torch.rand(1, generator=gen))
    return img * (1 - m) + ((1 - beta) * texture + beta * img) * m


def large_cutpaste(img, gen, area=(0.5, 0.8), aspect=(0.5, 2.0)):
    """Large CutPaste (Sec. 3.1): a patch covering 50-80% of the image, cut at one place of the image
    and pasted at another. img (C, H, W) -> (C, H, W)."""
    _, h, w = img.shape
    a = area[0] + (area[1] - area[0]) * float(torch.rand(1, generator=gen))
    r = math.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * float(torch.rand(1, generator=gen)))
    pw = min(1.0, math.sqrt(a * r))  # patch width as a fraction of W
    ph = min(1.0, a / pw)  # keeps the area when the width is clipped
    ph, pw = max(1, min(h - 1, round(ph * h))), max(1, min(w - 1, round(pw * w)))  # leave room to move
    pos = lambda n, s: int(torch.randint(0, n - s + 1, (1,), generator=gen))  # noqa: E731
    sy, sx = pos(h, ph), pos(w, pw)
    ty, tx = pos(h, ph), pos(w, pw)
    if (ty, tx) == (sy, sx):  # pasting in place changes nothing: move it to the far side
        ty, tx = h - ph - sy, w - pw - sx
    out = img.clone()
    out[:, ty:ty + ph, tx:tx + pw] = img[:, sy:sy + ph, sx:sx + pw]
    return out


def corrupt(x, gen, textures, cutpaste_prob=0.2, perlin_prob=0.5):
    """The training corruption I' of Sec. 3.1 for a batch (noDTD variant by default).

    x: (B, C, H, W) float in [0, 1]; textures: (T, C, H, W) uint8 images (the category's training images or
    a texture folder); gen: the only source of randomness. Each image gets a large CutPaste with
    probability cutpaste_prob, else a Perlin-shaped texture anomaly with probability perlin_prob, else
    stays clean. Returns (B, C, H, W)."""
    out = x.clone()
    for i in range(len(x)):
        u = float(torch.rand(1, generator=gen))
        if u < cutpaste_prob:
            out[i] = large_cutpaste(x[i], gen)
        elif u < cutpaste_prob + (1 - cutpaste_prob) * perlin_prob:
            t = common.to_float(textures[int(torch.randint(len(textures), (1,), generator=gen))])  # (C, H, W)
            k = int(torch.randint(4, (1,), generator=gen))
            t = torch.rot90(t, k if t.shape[1] == t.shape[2] else 2 * (k % 2), (1, 2))  # decorrelate position
            if float(torch.rand(1, generator=gen)) < 0.5:
                t = t.flip(2)
            out[i] = perlin_anomaly(x[i], t, gen)
    return out


def load_textures(folder, size):
    """Every image under `folder` (recursively, e.g. DTD's images/<class>/*.jpg) -> (T, 3, size, size) uint8."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in common.IMAGE_EXTS and p.is_file())
    if not paths:
        raise common.UserError(f"--textures {folder}: no images found")
    with ThreadPoolExecutor(4) as pool:
        imgs = list(pool.map(lambda p: common.read_image(p, size), paths))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- loss


def gaussian_window(size=11, sigma=1.5, device=None):
    t = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(x, y, size=11, sigma=1.5, data_range=1.0):
    """Mean SSIM of (B, C, H, W) images, per channel, Gaussian window, zero padding (DRAEM's/FAIR's code)."""
    c = x.shape[1]
    w = gaussian_window(size, sigma, x.device).expand(c, 1, size, size)  # (C, 1, k, k)
    f = lambda t: F.conv2d(t, w, padding=size // 2, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cov = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


def fair_loss(recon, target):
    """Eq. (7): l2(I, I^r) + L_SSIM(I, I^r), L_SSIM = 1 - SSIM. Returns (total, parts)."""
    l2 = F.mse_loss(recon, target)
    l_ssim = 1 - ssim(recon, target)
    return l2 + l_ssim, {"l2": l2.detach(), "ssim": l_ssim.detach()}


def lr_factor(step, total, milestones=(0.8, 0.9), gamma=0.2):
    """Paper Sec. 4.3: the learning rate is multiplied by 0.2 after 80% and after 90% of training.

    The multiplier of --lr at optimiser step `step` (1-based) of `total`; for a common.train hook."""
    return gamma ** sum(step > m * total for m in milestones)


# ----------------------------------------------------------------------------- anomaly score


def prewitt_gms(x, y, c=0.0026):
    """Gradient magnitude similarity (GMS) of (B, 1, H, W) images with 3x3 Prewitt kernels (RIAD's code)."""
    kx = x.new_tensor([[1.0, 0.0, -1.0]] * 3) / 3
    k = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    gx, gy = F.conv2d(x, k, padding=1), F.conv2d(y, k, padding=1)  # (B, 2, H, W)
    mx = torch.sqrt((gx ** 2).sum(1, keepdim=True) + 1e-12)  # (B, 1, H, W)
    my = torch.sqrt((gy ** 2).sum(1, keepdim=True) + 1e-12)
    return (2 * mx * my + c) / (mx ** 2 + my ** 2 + c)


def gradient_anomaly(x, r, scales=2):
    """Eq. (8): A_gradient = 1 - MSGMS(I, I^r), GMS of the luma averaged over `scales` pyramid levels
    (level s: 2^s average pooling, upsampled back bilinearly). (B, 3, H, W) x 2 -> (B, 1, H, W)."""
    gx, gr = luma(x), luma(r)  # (B, 1, H, W)
    size, total = gx.shape[-2:], 0
    for s in range(scales):
        if s:
            gx, gr = F.avg_pool2d(gx, 2), F.avg_pool2d(gr, 2)  # (B, 1, H/2^s, W/2^s)
        total = total + F.interpolate(prewitt_gms(gx, gr), size=size, mode="bilinear", align_corners=False)
    return 1 - total / scales  # (B, 1, H, W)


def rgb_to_lab(x):
    """sRGB (B, 3, H, W) in [0, 1] -> CIELAB (B, 3, H, W) [L, a, b], D65 white (IEC 61966-2-1, CIE 15)."""
    lin = torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)  # linear RGB
    m = x.new_tensor([[0.4124564, 0.3575761, 0.1804375],
                      [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]])
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)  # (B, 3, H, W) X, Y, Z
    xyz = xyz / x.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)  # relative to the D65 white
    d = 6 / 29
    f = torch.where(xyz > d ** 3, xyz.clamp(min=d ** 3) ** (1 / 3), xyz / (3 * d * d) + 4 / 29)
    fx, fy, fz = f.unbind(1)  # (B, H, W) each
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)  # (B, 3, H, W)


def color_anomaly(x, r):
    """Eq. (9): A_color = (a' - a)^2 + (b' - b)^2 in CIELAB, L ignored. (B, 3, H, W) x 2 -> (B, 1, H, W)."""
    d = rgb_to_lab(r)[:, 1:] - rgb_to_lab(x)[:, 1:]  # (B, 2, H, W)
    return (d ** 2).sum(1, keepdim=True)


def mean_filter_side(smooth, h, w):
    """The side of f_mean at h x w: `smooth` at 256x256 (the paper's 21, given for its 256 px input), scaled
    with the image side as D0 is, so it covers the same part of the image at every size; the nearest odd
    number (11 at 128 px, 41 at 512 px)."""
    return max(1, 2 * round((smooth * math.sqrt(h * w) / 256 - 1) / 2) + 1)


def anomaly_map(x, r, k=3e-4, smooth=21):
    """Eq. (10): A_score = (k A_color + A_gradient) * f_mean (zero padding, side `smooth` at 256 px, scaled:
    mean_filter_side); image score = max of the map. x, r: (B, 3, H, W) in [0, 1] -> (maps (B, 1, H, W),
    scores (B,))."""
    a = k * color_anomaly(x, r) + gradient_anomaly(x, r)  # (B, 1, H, W)
    s = mean_filter_side(smooth, *a.shape[-2:])
    a = F.avg_pool2d(a, s, stride=1, padding=s // 2, count_include_pad=True)  # zero padding
    return a, a.flatten(1).amax(1)


# ----------------------------------------------------------------------------- train


def make_batch(x, gen, textures, cutpaste_prob, perlin_prob):
    """x (B, 3, H, W) clean -> the step's batch; runs in the loader workers (module level: picklable).
    The high-pass runs inside the model, on the training device."""
    return {"input": corrupt(x, gen, textures, cutpaste_prob, perlin_prob), "target": x}


def loss_fn(net, b):
    recon = net(b["input"])  # (B, 3, H, W)
    return fair_loss(recon.float(), b["target"])


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    cfg = Config(base=args.base, in_channels=2 if args.filter == "sobel" else 1, filter=args.filter, d0=args.d0,
                 order=args.order, image_size=args.image_size)
    model = FAIR(cfg)
    images = common.train_images(args)  # (M, 3, H, W) uint8, train/good minus the holdout
    textures = load_textures(args.textures, args.image_size) if args.textures else images
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, {args.filter} high-pass, "
          f"textures from {args.textures or 'the training images (noDTD)'}, "
          f"{common.n_params(model):,} parameters")
    common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images,
                 make_batch=partial(make_batch, textures=textures, cutpaste_prob=args.cutpaste_prob,
                                    perlin_prob=args.perlin_prob),
                 loss_fn=loss_fn, ckpt_path=f"{args.out}/{STAGE}.pt", lr_at=lr_factor)


# ----------------------------------------------------------------------------- inference API (evaluate.py)


def load_fair(path):
    """The frozen FAIR model and its checkpoint, rebuilt from the checkpoint alone."""
    ck = common.load_checkpoint(path, STAGE, hint="python -m baselines.fair --data PATH")
    return common.build_from_checkpoint(ck, FAIR, Config), ck


@torch.no_grad()
def fair_maps(model, ck, x):
    """Anomaly maps and image scores, Eq. (8)-(10), with the scoring settings stored in ck['args'].

    x: (B, 3, H, W) float in [0, 1] on the model's device -> (maps (B, 1, H, W) float32, scores (B,))."""
    a = ck.get("args", {})
    dev = next(model.parameters()).device
    with common.autocast(dev, a.get("amp", 1)):
        recon = model(x)  # (B, 3, H, W)
    recon = recon.float().clamp(0, 1)
    return anomaly_map(x.float(), recon, a.get("k_color", 3e-4), a.get("smooth", 21))


if __name__ == "__main__":
    common.run_main(main)
