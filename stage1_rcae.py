"""Stage 1: the Recursive Convolutional AutoEncoder (RcAE), paper "Methodology", Eq. (3)-(5).

One encoder block E and one decoder block D (each a 4-layer conv autoencoder with skips), shared over
every recursion step. E is followed by a 2x2 stride-2 conv, D ends with a 2x2 stride-2 transposed conv:

    compression     I_C^i = down(E(I_C^{i-1})),  i = 1..n,  I_C^0 = I            Eq. (3)
    reconstruction  I_R^j = up(D(I_R^{j-1})),    j = 1..n,  I_R^0 = I_C^n        Eq. (4)

A depth-n recursion gives a full-resolution reconstruction I_R^n; `reconstruct_all` returns all depths
n = 1..N sharing the compression path. Training samples n from [1, N] per batch, feeds the image with
pseudo anomalies part of the time, and asks for the clean image with Eq. (5): L1 on intensity + L1 on
the first-order gradient.

GPU (paper settings):  python stage1_rcae.py --data mvtec/bottle
CPU smoke run:         python stage1_rcae.py --data data/toy --image_size 128 --max_steps 150 --batch_size 8
Reads:  <data>/train/good (MVTec AD) or the VisA train split.
Writes: <out>/stage1_rcae.pt (and stage1_rcae.log.jsonl); <out> defaults to runs/<parent>/<category>.
"""
import argparse
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import grad

STAGE = "stage1_rcae"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_shared_args(p, epochs=1500)  # paper: 1500 epochs for stage 1
    g = p.add_argument_group("model (stage 1)")
    g.add_argument("--width", type=int, default=32, help="hidden width inside E and D (paper: not given)")
    g = p.add_argument_group("augmentation (stage 1)")
    g.add_argument("--anomaly_prob", type=float, default=0.5,
                   help="chance that a training image gets pseudo anomalies (paper: 'denoising', rate not given)")
    return common.finish_args(p.parse_args(argv))


# ----------------------------------------------------------------------------- model


@dataclass
class Config:
    channels: int = 3  # C of every space X_i between recursion steps: the image's channels (paper)
    width: int = 32  # hidden width inside E and D
    depth: int = 5  # N, the deepest recursion
    image_size: int = 1024  # training size; any size divisible by 2^N works at inference


def conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1)


class ConvAE(nn.Module):
    """A standard 4-layer conv autoencoder with a skip connection (a tiny U-Net); E, D and DPN are one each.

    (B, cin, H, W) -> (B, cout, H, W); any H, W (the upsample matches the skip's size)."""

    memory_format = torch.channels_last  # oneDNN's fast 2D layout: x1.6 on CPU (benchmarks/optimisations.py)

    def __init__(self, cin, cout, width):
        super().__init__()
        self.enc1 = conv(cin, width)  # (B, w, H, W)
        self.enc2 = conv(width, 2 * width, stride=2)  # (B, 2w, H/2, W/2)
        self.dec2 = conv(2 * width, width)  # (B, w, H/2, W/2), then upsampled
        self.dec1 = conv(2 * width, cout)  # skip concat (B, 2w, H, W) -> (B, cout, H, W)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, *parts):
        """The input is the channel concat of parts (B, c_i, H, W), sum c_i = cin (DPN's I_R^n (+) I')."""
        parts = [p.contiguous(memory_format=self.memory_format) for p in parts]
        h1 = self.act(common.conv_cat(self.enc1, *parts))  # (B, w, H, W)
        h2 = self.act(self.enc2(h1))  # (B, 2w, H/2, W/2)
        u = F.interpolate(self.act(self.dec2(h2)), size=h1.shape[-2:], mode="bilinear", align_corners=False)
        out = common.conv_cat(self.dec1, u, h1)  # dec1 on the skip concat [u, h1]: (B, cout, H, W)
        return out.contiguous()  # plain layout for callers: x1.3 on DPN's loss over stacked depths, and .view works


class RcAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c, w = cfg.channels, cfg.width
        self.E = ConvAE(c, c, w)  # shared over all compression steps
        self.down = nn.Conv2d(c, c, 2, stride=2)  # X_{i-1} -> X_i, halves H and W
        self.D = ConvAE(c, c, w)  # shared over all reconstruction steps
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)  # X_{j} -> X_{j-1}, doubles H and W

    def compress(self, x, n):
        """[I_C^1, ..., I_C^n]; I_C^i is (B, C, H/2^i, W/2^i)."""
        codes = []
        for _ in range(n):
            x = self.down(self.E(x))  # Eq. (3): I_C^i = E(I_C^{i-1})
            codes.append(x)
        return codes

    def reconstruct(self, code, n):
        """n reconstruction steps from a code at level n: (B, C, H/2^n, W/2^n) -> (B, C, H, W)."""
        for _ in range(n):
            code = self.up(self.D(code))  # Eq. (4): I_R^j = D(I_R^{j-1})
        return code

    def forward(self, x, n=None):
        """The depth-n reconstruction I_R^n of x (B, C, H, W); n defaults to N."""
        n = n or self.cfg.depth
        return self.reconstruct(self.compress(x, n)[-1], n)  # (B, C, H, W)

    def reconstruct_all(self, x, depths=None):
        """Every depth's full-resolution reconstruction, sharing the compression path.

        x (B, C, H, W) -> (B, len(depths), C, H, W), depths default 1..N (the "sequence {I_R^n}")."""
        depths = list(depths or range(1, self.cfg.depth + 1))
        codes = self.compress(x, max(depths))
        return torch.stack([self.reconstruct(codes[n - 1], n) for n in depths], 1)  # (B, N, C, H, W)


# ----------------------------------------------------------------------------- loss


def recon_loss(recon, target):
    """Eq. (5): |I - I_R^n|_1 + |I' - (I_R^n)'|_1 (mean absolute errors). Returns (total, parts)."""
    l1 = (recon - target).abs().mean()
    l1_grad = (grad(recon) - grad(target)).abs().mean()
    return l1 + l1_grad, {"l1": l1.detach(), "l1_grad": l1_grad.detach()}


# ----------------------------------------------------------------------------- train


def make_batch(x, gen, anomaly_prob, depth):
    """x (B, C, H, W) clean -> the step's batch; runs in the loader workers (module level: picklable)."""
    noisy, _ = common.augment_batch(x, gen, anomaly_prob)  # denoising on pseudo anomalies
    n = torch.randint(1, depth + 1, (1,), generator=gen)  # recursion depth sampled per batch from [1, N]
    return {"input": noisy, "target": x, "n": n}


def loss_fn(net, b):
    recon = net(b["input"], int(b["n"]))  # (B, C, H, W)
    return recon_loss(recon.float(), b["target"])


def main(argv=None):
    args = get_args(argv)
    common.seed_everything(args.seed)
    cfg = Config(channels=3, width=args.width, depth=args.depth, image_size=args.image_size)
    model = RcAE(cfg)
    images = common.train_images(args)  # (M, 3, H, W) uint8, train/good minus the holdout
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, depth N={cfg.depth}, "
          f"{common.n_params(model):,} parameters")

    common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images,
                 make_batch=partial(make_batch, anomaly_prob=args.anomaly_prob, depth=cfg.depth),
                 loss_fn=loss_fn, ckpt_path=f"{args.out}/{STAGE}.pt")


def load_rcae(path):
    """The frozen RcAE and its checkpoint, rebuilt from the checkpoint alone."""
    ck = common.load_checkpoint(path, STAGE, hint="python stage1_rcae.py --data PATH")
    return common.freeze(common.build_from_checkpoint(ck, RcAE, Config)), ck


if __name__ == "__main__":
    common.run_main(main)
