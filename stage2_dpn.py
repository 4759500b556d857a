"""Stage 2: the Detail Preservation Network (DPN), paper "Detail Preservation Network", Eq. (6)-(7).

The frozen RcAE of stage 1 loses fine texture with every recursion step. DPN, one 4-layer conv
autoencoder with skips shared by every depth n, predicts the missing detail as a residual from the
reconstruction and the gradient I' of the input image:

    Res_D^n = f_DPN(I_R^n (+) I'),   I_D^n = I_R^n + Res_D^n                         Eq. (6)
    L_DPN   = |I_D^n - I|_1 + |(I_D^n)' - I'|_1                                       Eq. (7)

((+) is channel concatenation.) RcAE is frozen and only clean normal images are used (paper), so DPN learns
the detail that recursion removes from normal texture; what it adds back on an anomaly it has never seen
is whatever I' suggests. Each step refines all N depths of a batch at once. The last conv starts at zero: at
initialisation I_D^n = I_R^n.

GPU (paper settings):  python stage2_dpn.py --data mvtec/bottle
CPU recipe:            python stage2_dpn.py --data mvtec/bottle --recipe cpu
Reads:  <out>/stage1_rcae.pt (--rcae; image size, depth, holdout, resize and train fraction are inherited from
        it) and the same training images as stage 1.
Writes: <out>/stage2_dpn.pt (and stage2_dpn.log.jsonl).
"""
import argparse
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

import common
from common import image_gradient
from stage1_rcae import ConvAE, load_rcae

STAGE = "stage2_dpn"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    g = common.add_shared_args(p, first=False, epochs=400)  # paper: 400 epochs
    g["data"].add_argument("--rcae", help="stage-1 checkpoint, frozen (default: <out>/stage1_rcae.pt)")
    g["model"].add_argument("--width", type=int, default=32, help="hidden width of the DPN autoencoder (paper: not "
                                                                  "given)")
    return common.parse_args(p, argv, STAGE)


def upstream_rcae(args):
    """Load the frozen RcAE of --rcae and take its image size, depth, holdout, resize and train fraction."""
    args.rcae = args.rcae or f"{args.out}/stage1_rcae.pt"
    rcae, ck = load_rcae(args.rcae)
    for k in common.INHERITED:
        setattr(args, k, ck["args"][k])
    if Path(ck["args"]["data"]).resolve() != Path(args.data).resolve():
        common.warn(f"{args.rcae} was trained on {ck['args']['data']}, this stage trains on {args.data}")
    return rcae, ck


# ----------------------------------------------------------------------------- model


@dataclass
class Config:
    channels: int = 3  # C, inherited from the RcAE
    depth: int = 5  # N, inherited: one DPN refines every depth 1..N
    image_size: int = 1024  # training size, inherited
    width: int = 32  # hidden width of the autoencoder


class DPN(nn.Module):
    """f_DPN of Eq. (6): a ConvAE from (I_R^n (+) I') with 3C channels to the residual Res_D^n with C."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.ae = ConvAE(3 * c, c, cfg.width)  # I_R^n has C channels, I' = grad(I) has 2C
        # zero residual at initialisation: training starts from I_D^n = I_R^n, never from a broken image
        nn.init.zeros_(self.ae.dec1.weight)
        nn.init.zeros_(self.ae.dec1.bias)

    def forward(self, recon, image):
        """Res_D^n of recon (B, C, H, W), or of every depth for recon (B, N, C, H, W)."""
        g = image_gradient(image)  # (B, 2C, H, W), I' computed once per image
        if recon.dim() == 5:  # one depth at a time: x1.4 over folding N into the batch (benchmarks/README.md)
            return torch.stack([self.ae(recon[:, k], g) for k in range(recon.shape[1])], 1)  # (B, N, C, H, W)
        return self.ae(recon, g)  # Eq. (6): f_DPN(I_R^n (+) I'), the concat inside the first conv

    def refine(self, recons, image):
        """I_D^n = I_R^n + Res_D^n for recons (B, N, C, H, W) and image (B, C, H, W) -> (B, N, C, H, W)."""
        return recons + self(recons, image)  # Eq. (6)


# ----------------------------------------------------------------------------- loss


def dpn_loss(refined, image):
    """Eq. (7): |I_D^n - I|_1 + |(I_D^n)' - I'|_1 as means over every depth and pixel.

    refined (B, N, C, H, W), image (B, C, H, W). Returns (total, parts)."""
    target = image[:, None].expand_as(refined)  # (B, N, C, H, W)
    l1 = (refined - target).abs().mean()
    l1_grad = (image_gradient(refined.flatten(0, 1)) - image_gradient(target.flatten(0, 1))).abs().mean()
    return l1 + l1_grad, {"l1": l1.detach(), "l1_grad": l1_grad.detach()}


# ----------------------------------------------------------------------------- train


def make_batch(x, gen):
    """Clean normal images only (paper): x (B, C, H, W)."""
    return {"image": x}


def loss_fn(net, b, rcae):
    x = b["image"]  # (B, C, H, W), the input of RcAE and of I', and the target
    with torch.no_grad():  # RcAE is frozen: nothing flows back into it
        recons = rcae.reconstruct_all(x).float()  # {I_R^n}, (B, N, C, H, W)
    refined = recons + net(recons, x)  # Eq. (6), all depths in one call, (B, N, C, H, W)
    loss, parts = dpn_loss(refined.float(), x)
    parts["l1_rcae"] = (recons - x[:, None]).abs().mean()  # the error DPN starts from: l1 should drop below it
    return loss, parts


def main(argv=None):
    args = get_args(argv)
    rcae, rcae_ck = upstream_rcae(args)
    torch.manual_seed(args.seed)
    cfg = Config(channels=rcae.cfg.channels, depth=args.depth, image_size=args.image_size, width=args.width)
    model = DPN(cfg)
    rcae.to(common.get_device(args.device))
    images = common.train_images(args)  # (M, 3, H, W) uint8, the same train/good minus holdout as stage 1
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, refining depths 1..{cfg.depth}, "
          f"{common.n_params(model):,} parameters; RcAE frozen from {args.rcae}")

    upstream = {"rcae": str(Path(args.rcae).resolve()), "rcae_sha": common.fingerprint(rcae_ck["model"])}
    common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images, make_batch=make_batch,
                 loss_fn=partial(loss_fn, rcae=rcae), ckpt_path=f"{args.out}/{STAGE}.pt", extra={"upstream": upstream})


def load_dpn(path):
    """The frozen DPN and its checkpoint, rebuilt from the checkpoint alone."""
    ck = common.load_checkpoint(path, STAGE, hint="python stage2_dpn.py --data PATH")
    return common.build_from_checkpoint(ck, DPN, Config), ck


if __name__ == "__main__":
    common.run_main(main)
