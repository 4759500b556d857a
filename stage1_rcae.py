"""Stage 1: the Recursive Convolutional AutoEncoder (RcAE), paper "Methodology", Eq. (3)-(5).

One encoder block E and one decoder block D (each a 4-layer conv autoencoder with skips), shared over
every recursion step. E is followed by a 2x2 stride-2 conv, D ends with a 2x2 stride-2 transposed conv:

    compression     I_C^i = down(E(I_C^{i-1})),  i = 1..n,  I_C^0 = I            Eq. (3)
    reconstruction  I_R^j = up(D(I_R^{j-1})),    j = 1..n,  I_R^0 = I_C^n        Eq. (4)

A depth-n recursion gives a full-resolution reconstruction I_R^n; `reconstruct_all` returns all depths
n = 1..N sharing the compression path. Training samples n uniformly from [1, N] per batch ("Training Strategy"),
feeds the image with pseudo anomalies part of the time, and asks for the clean image with Eq. (5): L1 on
intensity + L1 on the first-order image gradient.

The paper's ablations (Tables 2, 4, 5) are the same network with three switches, each a flag, a Config
field and a checkpoint key:

    --share 0     level i has its own E_i, down_i, D_i, up_i: the stacked blocks of Eq. (2),
                  f_deep = D_1 o ... o D_N o E_N o ... o E_1, with N times the parameters
    --skip 0      the blocks E, D without the skip connection inside them (Table 4)
    --arch convae a single pass through all N levels: trained and run at depth N only, no random depth.
                  With --share 0 this is the paper's "ConvAE" (Eq. (2) trained with Eq. (1)/(5)).
                  A ConvAE has no depth-n output for n < N, so `reconstruct_all` repeats its one
                  reconstruction I_R^N for every depth asked: stages 2-3, evaluate.py and the
                  notebooks run unchanged, and CRD sees no recursion dynamics (there are none).

GPU (paper settings):  python stage1_rcae.py --data mvtec/bottle
CPU recipe:            python stage1_rcae.py --data mvtec/bottle --recipe cpu
CPU smoke run:         python stage1_rcae.py --data data/toy --recipe cpu --image_size 64 --max_steps 300
Reads:  the normal training images of --data (train/good in the MVTec AD layout), minus the holdout.
Writes: <out>/stage1_rcae.pt (and stage1_rcae.log.jsonl); <out> defaults to runs/<parent>/<category>.
"""
import argparse
import copy
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import image_gradient

STAGE = "stage1_rcae"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    g = common.add_shared_args(p, epochs=1500)  # paper: 1500 epochs for stage 1
    g["model"].add_argument("--width", type=int, default=32, help="hidden width inside E and D (paper: not given)")
    g["model"].add_argument("--standardise", type=int, default=1,
                            help="1: standardise the input with the training images' per-channel mean and std, and "
                                 "undo it on the output (paper: not given, i.e. 0, raw [0, 1] input; "
                                 "docs/reading_the_paper.md)")
    g["model"].add_argument("--updown_init", choices=["default", "pca"], default="default",
                            help="start of the 2x2 down and up layers: default (PyTorch's; paper: not given) or pca "
                                 "(the top-C principal components of the training images' 2x2 blocks)")
    g["model"].add_argument("--arch", choices=["rcae", "convae"], default="rcae",
                            help="rcae: the recursion, depth n drawn from [1, N] per batch (paper); convae: one pass "
                                 "through all N levels, depth N only (the paper's ConvAE of Tables 2 and 4)")
    g["model"].add_argument("--share", type=int, default=1,
                            help="1: one E and one D shared by every level (paper, Eq. (3)-(4)); 0: N independent "
                                 "blocks E_i, D_i (Eq. (2), Table 4)")
    g["model"].add_argument("--skip", type=int, default=1,
                            help="1: E and D keep their skip connection (paper); 0: without it (Table 4)")
    g["optimisation"].add_argument("--ema", type=float, default=0.0,
                                   help="0: save the last step's weights (paper); DECAY in (0, 1): save the moving "
                                        "average of the weights over about the last 1/(1-DECAY) steps")
    common.add_anomaly_args(g["data"], "chance that a training image gets pseudo anomalies (paper: denoising, "
                                       "rate not given)")
    args = common.parse_args(p, argv, STAGE)
    common.check_flags(args, standardise="0/1", share="0/1", skip="0/1")
    return args


# ----------------------------------------------------------------------------- model


@dataclass
class Config:
    channels: int = 3  # C of every space X_i between recursion steps: the image's channels (paper)
    width: int = 32  # hidden width inside E and D
    depth: int = 5  # N, the deepest recursion
    image_size: int = 1024  # training size; any size divisible by 2^N works at inference
    standardise: int = 1  # standardise with the training set's per-channel mean/std (buffers), undo on output
    arch: str = "rcae"  # "convae": a single pass at depth N (Eq. (2)), no random depth
    share: int = 1  # 1: one E, D for all levels (Eq. (3)-(4)); 0: level i's own E_i, D_i (Eq. (2))
    skip: int = 1  # 0: E and D without their inner skip connection


def conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1)


class ConvAE(nn.Module):
    """A standard 4-layer conv autoencoder with a skip connection (a tiny U-Net); E, D and DPN are one each.

    (B, cin, H, W) -> (B, cout, H, W); any H, W (the upsample matches the skip's size). skip=False drops
    the skip connection: the last conv sees the upsampled path only."""

    memory_format = torch.channels_last  # a speed choice only (benchmarks/README.md)

    def __init__(self, cin, cout, width, skip=True):
        super().__init__()
        self.skip = skip
        self.enc1 = conv(cin, width)  # (B, w, H, W)
        self.enc2 = conv(width, 2 * width, stride=2)  # (B, 2w, H/2, W/2)
        self.dec2 = conv(2 * width, width)  # (B, w, H/2, W/2), then upsampled
        self.dec1 = conv(2 * width if skip else width, cout)  # skip concat (B, 2w, H, W) -> (B, cout, H, W)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, *parts):
        """The input is the channel concat of parts (B, c_i, H, W), sum c_i = cin (DPN's I_R^n (+) I')."""
        parts = [p.contiguous(memory_format=self.memory_format) for p in parts]
        h1 = self.act(common.conv_cat(self.enc1, *parts))  # (B, w, H, W)
        h2 = self.act(self.enc2(h1))  # (B, 2w, H/2, W/2)
        u = F.interpolate(self.act(self.dec2(h2)), size=h1.shape[-2:], mode="bilinear", align_corners=False)
        out = common.conv_cat(self.dec1, u, h1) if self.skip else self.dec1(u)  # on [u, h1] or u: (B, cout, H, W)
        return out.contiguous()  # plain layout for callers (.view works; benchmarks/README.md)


class RcAE(nn.Module):
    """The recursion of Eq. (3)-(4); with cfg.share=0 the stacked blocks of Eq. (2), with cfg.arch="convae"
    a single pass at depth N (see the module docstring)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c, w = cfg.channels, cfg.width

        def per_level(make):  # one module shared by every level (Eq. (3)-(4)), or one per level (Eq. (2))
            return make() if cfg.share else nn.ModuleList(make() for _ in range(cfg.depth))

        self.E = per_level(lambda: ConvAE(c, c, w, cfg.skip))  # all compression steps
        self.down = per_level(lambda: nn.Conv2d(c, c, 2, stride=2))  # X_{i-1} -> X_i, halves H and W
        self.D = per_level(lambda: ConvAE(c, c, w, cfg.skip))  # all reconstruction steps
        self.up = per_level(lambda: nn.ConvTranspose2d(c, c, 2, stride=2))  # X_i -> X_{i-1}, doubles H and W
        # the training images' per-channel mean and std (set by fit_standardise; identity until then)
        self.register_buffer("in_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("in_std", torch.ones(1, c, 1, 1))

    def fit_standardise(self, images):
        """Set the input standardisation from uint8 training images (M, C, H, W); a no-op without standardise."""
        if self.cfg.standardise:
            x = images.double().div(255).transpose(0, 1).flatten(1)  # (C, M*H*W)
            self.in_mean.copy_(x.mean(1).view(1, -1, 1, 1))
            self.in_std.copy_(x.std(1).clamp_min(1e-3).view(1, -1, 1, 1))

    @torch.no_grad()
    def init_updown_pca(self, images):
        """--updown_init pca: every level's down starts as the projection of a 2x2 block onto the top-C
        principal components of the standardised training images' blocks (uint8 (M, C, H, W)), its up as the
        map back: the best linear code of C numbers per block."""
        c = self.cfg.channels
        mean, v = block_pca((common.to_float(images) - self.in_mean) / self.in_std, 2, c)  # (C 4,), (C, C 4)
        for i in range(1, self.cfg.depth + 1):  # with sharing, the one module each time
            down, up = self.level(self.down, i), self.level(self.up, i)
            down.weight.copy_(v.view(c, c, 2, 2))  # code_k = v_k . (block - mean)
            down.bias.copy_(-(v @ mean))
            up.weight.copy_(v.view(c, c, 2, 2))  # block = sum_k code_k v_k + mean (per channel)
            up.bias.copy_(mean.view(c, 4).mean(1))

    def output(self, y):
        """The network's last tensor (standardised space) -> the reconstruction in image space."""
        return y * self.in_std + self.in_mean if self.cfg.standardise else y

    def level(self, modules, i):
        """The block of level i = 1..N: the one shared module, or level i's own without sharing (Eq. (2))."""
        return modules if self.cfg.share else modules[i - 1]

    def compress(self, x, n):
        """[I_C^1, ..., I_C^n]; I_C^i is (B, C, H/2^i, W/2^i)."""
        if self.cfg.standardise:
            x = (x - self.in_mean) / self.in_std
        codes = []
        for i in range(1, n + 1):
            x = self.level(self.down, i)(self.level(self.E, i)(x))  # Eq. (3): I_C^i = E(I_C^{i-1})
            codes.append(x)
        return codes

    def reconstruct(self, code, n):
        """n reconstruction steps from a code at level n: (B, C, H/2^n, W/2^n) -> (B, C, H, W)."""
        for i in range(n, 0, -1):  # level i -> i-1
            code = self.level(self.up, i)(self.level(self.D, i)(code))  # Eq. (4): I_R^j = D(I_R^{j-1})
        return self.output(code)

    def forward(self, x, n=None):
        """The depth-n reconstruction I_R^n of x (B, C, H, W); n defaults to N (a ConvAE has depth N only)."""
        n = self.cfg.depth if n is None else n
        if not 1 <= n <= self.cfg.depth:
            raise ValueError(f"recursion depth n={n} is not in 1..N={self.cfg.depth}")
        if self.cfg.arch == "convae" and n != self.cfg.depth:
            raise ValueError(f"a ConvAE (arch='convae') has only its depth-{self.cfg.depth} output, not depth {n}")
        return self.reconstruct(self.compress(x, n)[-1], n)  # (B, C, H, W)

    def reconstruct_all(self, x, depths=None):
        """Every depth's full-resolution reconstruction, sharing the compression path.

        x (B, C, H, W) -> (B, len(depths), C, H, W), depths default 1..N (the "sequence {I_R^n}").
        A ConvAE's one output I_R^N stands for every depth (module docstring)."""
        depths = list(depths or range(1, self.cfg.depth + 1))
        if self.cfg.arch == "convae":
            return self(x)[:, None].expand(-1, len(depths), -1, -1, -1).contiguous()  # (B, N, C, H, W)
        codes = self.compress(x, max(depths))
        return torch.stack([self.reconstruct(codes[n - 1], n) for n in depths], 1)  # (B, N, C, H, W)


# ----------------------------------------------------------------------------- loss


def recon_loss(recon, target):
    """Eq. (5): |I - I_R^n|_1 + |I' - (I_R^n)'|_1 (mean absolute errors). Returns (total, parts)."""
    l1 = (recon - target).abs().mean()
    l1_grad = (image_gradient(recon) - image_gradient(target)).abs().mean()
    return l1 + l1_grad, {"l1": l1.detach(), "l1_grad": l1_grad.detach()}


# ----------------------------------------------------------------------------- train


def make_batch(x, gen, depth, random_depth=True, anomaly_prob=0.5, anomaly_size="scaled", anomaly_colour="uniform"):
    """x (B, C, H, W) clean -> the step's batch; runs in the loader workers (module level: picklable)."""
    noisy, _ = common.augment_batch(x, gen, anomaly_prob, anomaly_size, anomaly_colour)  # denoising
    # the recursion depth, drawn per batch uniformly from [1, N] ("Training Strategy"); a ConvAE always runs all N
    n = torch.randint(1, depth + 1, (1,), generator=gen) if random_depth else torch.tensor([depth])
    return {"input": noisy, "target": x, "n": n}


def loss_fn(net, b):
    recon = net(b["input"], int(b["n"]))  # (B, C, H, W)
    return recon_loss(recon.float(), b["target"])


class EMA:
    """--ema DECAY: an exponential moving average of the trained weights (Polyak averaging), what a finished run
    saves (paper: none). A large constant lr leaves the last step's weights wherever Adam's noise put them; the
    average over about the last 1/(1 - DECAY) steps is not moved by it, and training itself is unchanged.
    decay_t = min(DECAY, (1 + t) / (10 + t)) after t steps, so the first steps are not averaged with the init."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model)  # (never receives gradients)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            e.lerp_(m, 1 - d) if e.is_floating_point() else e.copy_(m)  # buffers that never change stay as they are


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    cfg = Config(channels=3, width=args.width, depth=args.depth, image_size=args.image_size,
                 standardise=args.standardise, arch=args.arch, share=args.share, skip=args.skip)
    model = RcAE(cfg)
    images = common.train_images(args)  # (M, 3, H, W) uint8, train/good minus the holdout
    model.fit_standardise(images)
    if args.updown_init == "pca":
        model.init_updown_pca(images)
    holdout = common.train_images(args, part="holdout")
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, depth N={cfg.depth}, {cfg.arch} "
          f"(share {cfg.share}, skip {cfg.skip}), {common.n_params(model):,} parameters")

    common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images,
                 make_batch=partial(make_batch, depth=cfg.depth, random_depth=cfg.arch == "rcae",
                                    anomaly_prob=args.anomaly_prob, anomaly_size=args.anomaly_size,
                                    anomaly_colour=args.anomaly_colour),
                 loss_fn=loss_fn, ckpt_path=f"{args.out}/{STAGE}.pt", ema=EMA(model, args.ema) if args.ema else None,
                 validate=partial(recon_report, images=holdout, batch_size=args.batch_size) if len(holdout) else None)


def block_pca(x, s, k, chunk=64):
    """x (M, C, H, W) float -> (mean (C s s,), the top-k principal directions (k, C s s)) of its s x s blocks
    (unfold order: channel, row, column); the covariance is summed over chunks of images, in float64."""
    total, outer, count = 0, 0, 0
    for i in range(0, len(x), chunk):
        b = F.unfold(x[i:i + chunk].double(), s, stride=s).transpose(1, 2).flatten(0, 1)  # (blocks, C s s)
        total, outer, count = total + b.sum(0), outer + b.T @ b, count + len(b)
    mean = total / count
    cov = outer / count - mean[:, None] * mean[None]
    v = torch.linalg.eigh(cov).eigenvectors.flip(1)[:, :k].T  # eigh sorts ascending
    return mean.float(), v.float().contiguous()


def blur(x, n):
    """The depth-n reference that needs no training: a 2^n down/up blur, (B, C, H, W) -> (B, C, H, W): as much
    information as the depth-n code (C x H/2^n x W/2^n), averaged down and bilinearly up."""
    return F.interpolate(F.avg_pool2d(x, 2 ** n), size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def recon_report(model, images, batch_size=8):
    """How well each depth reconstructs clean images (uint8 (M, C, H, W), the holdout), against two references
    that need no training: the image's mean colour, and a 2^n down/up blur (as much information as the
    depth-n code, C x H/2^n x W/2^n). Returns {l1_n, psnr_n, l1_mean, l1_blur_n, ratio_mean_n, ratio_blur_n}:
    a depth that learned nothing has ratio_mean near 1; one as good as the blur, ratio_blur near 1."""
    device = next(model.parameters()).device
    depths = range(1, model.cfg.depth + 1)
    sums = {}

    def add(k, v):
        sums[k] = sums.get(k, 0.0) + float(v)

    for i in range(0, len(images), batch_size):
        x = common.to_float(images[i:i + batch_size]).to(device)  # (b, C, H, W)
        recons = model.reconstruct_all(x).float().clamp(0, 1)  # (b, N, C, H, W), shown as an image would be
        add("l1_mean", (x - x.mean((2, 3), keepdim=True)).abs().mean((1, 2, 3)).sum())
        for n in depths:
            err = (recons[:, n - 1] - x)  # (b, C, H, W)
            add(f"l1_{n}", err.abs().mean((1, 2, 3)).sum())
            add(f"psnr_{n}", (-10 * torch.log10(err.pow(2).mean((1, 2, 3)).clamp_min(1e-10))).sum())
            add(f"l1_blur_{n}", (blur(x, n) - x).abs().mean((1, 2, 3)).sum())
    rep = {k: v / len(images) for k, v in sums.items()}
    for n in depths:
        rep[f"ratio_mean_{n}"] = rep[f"l1_{n}"] / max(rep["l1_mean"], 1e-12)
        rep[f"ratio_blur_{n}"] = rep[f"l1_{n}"] / max(rep[f"l1_blur_{n}"], 1e-12)
    return rep


def load_rcae(path):
    """The frozen RcAE and its checkpoint, rebuilt from the checkpoint alone."""
    ck = common.load_checkpoint(path, STAGE, hint="python stage1_rcae.py --data PATH")
    return common.build_from_checkpoint(ck, RcAE, Config), ck


if __name__ == "__main__":
    common.run_main(main)
