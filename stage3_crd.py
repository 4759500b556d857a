"""Stage 3: Cross Recursion Detection (CRD), paper "Cross Recursion Detection", Eq. (8)-(9).

Normal regions settle after a few recursion steps, anomalies keep changing. CRD, a 4-level 3D conv
U-Net, looks at every depth's detail-enhanced reconstruction next to the input at once (the recursion
axis is the 3D convolutions' third axis) and predicts the anomaly map:

    M_A   = f_CRD(I_D^n (+) I),  n in use_depths (all of 1..N by default)            Eq. (8)
            (by default each depth enters as the residual I - I_D^n next to I: --crd_input image is the paper's,
            --crd_input both adds the residual before DPN, I - I_R^n)
    L_CRD = |M_A - M_P|_2 + |M_A' - M_P'|_2                                           Eq. (9)

RcAE and DPN are frozen; the input has pseudo anomalies (mask M_P) part of the time. The image score
is the mean of the top --topk_frac of M_A's pixels. After training, the holdout normal images (train/good
kept out of every stage's training, never the test split) are scored, and their --threshold_quantile
is stored in the checkpoint as the image threshold. `load_chain` rebuilds the chain (or the part of it
that is trained) for evaluate.py; `load_detector` the whole Detector for notebooks and benchmarks.

GPU (paper settings):  python stage3_crd.py --data mvtec/bottle
CPU smoke run:         python stage3_crd.py --data data/toy --max_steps 100 --batch_size 8
Table 6 (N_R = 3):     python stage3_crd.py --data mvtec/bottle --use_depths 1,3,5 --out runs/mvtec/bottle_nr3 \
                           --rcae runs/mvtec/bottle/stage1_rcae.pt --dpn runs/mvtec/bottle/stage2_dpn.pt
Reads:  <out>/stage1_rcae.pt (--rcae) and <out>/stage2_dpn.pt (--dpn), both from the same RcAE;
        image_size, depth and holdout are inherited from them. The train/good images.
Writes: <out>/stage3_crd.pt (with the holdout calibration) and stage3_crd.log.jsonl.
"""
import argparse
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError, grad
from stage1_rcae import load_rcae
from stage2_dpn import load_dpn, upstream_rcae

STAGE = "stage3_crd"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    common.add_shared_args(p, upstream=True, epochs=300)  # paper: 300 epochs
    g = p.add_argument_group("model (stage 3)")
    g.add_argument("--width", type=int, default=16, help="CRD base width w; levels have w, 2w, 4w, 8w (paper: not given)")
    g.add_argument("--use_depths", default=None,
                   help="recursion depths fed to CRD, comma-separated, e.g. 1,3,5 (default: all of 1..N, "
                        "as in the paper; its Table 6 ablates 5 and 1,3,5)")
    g.add_argument("--crd_input", choices=list(INPUTS), default="residual",
                   help="what CRD sees of each depth next to I: the residual I - I_D^n (default) or the refined I_D^n "
                        "itself (the paper's Eq. (8)). The same information; the residual puts the anomaly signal in "
                        "the input instead of leaving the difference to be learnt (README, 'Reading the paper'). "
                        "'both': the residuals before and after DPN, I - I_R^n and I - I_D^n")
    g.add_argument("--crd_padding", choices=PADDINGS, default="zeros",
                   help="padding of CRD's 3x3x3 convs: zeros (PyTorch's default; the paper gives none), or replicate, "
                        "which gives CRD no explicit cue that a pixel is at the image border")
    g.add_argument("--crd_norm", choices=NORMS, default="none",
                   help="none, or position: divide each depth's residual by how large it is at that pixel, relative "
                        "to the whole image, on the normal training images (for --crd_input residual or both)")
    g = p.add_argument_group("loss (stage 3)")
    g.add_argument("--loss", choices=["l2", "bce", "focal"], default="l2",
                   help="mask term of Eq. (9): l2 (paper), or binary cross-entropy / focal (gamma 2, DRAEM) on the "
                        "logits; the gradient term stays L2")
    g.add_argument("--init_prior", type=float, default=0.0,
                   help="start M_A at this anomalous-pixel rate (the head's bias = its logit, as RetinaNet does "
                        "for rare positives); 0 = PyTorch's default init, M_A about 0.5 everywhere (paper: not given)")
    g = p.add_argument_group("augmentation (stage 3)")
    common.add_anomaly_args(g, "chance that a training image gets pseudo anomalies, else all-zero mask (paper: not given)")
    g = p.add_argument_group("scoring (stage 3)")
    g.add_argument("--topk_frac", type=float, default=0.01,
                   help="image score = mean of this top fraction of M_A's pixels (paper: top-k mean, k not given)")
    g.add_argument("--threshold_quantile", type=float, default=0.99,
                   help="image threshold = this quantile of the holdout normal scores (not in the paper)")
    g = p.add_argument_group("upstream (stage 3)")
    g.add_argument("--rcae", default=None, help="stage-1 checkpoint, frozen (default: <out>/stage1_rcae.pt)")
    g.add_argument("--dpn", default=None, help="stage-2 checkpoint of the same RcAE, frozen (default: <out>/stage2_dpn.pt)")
    args = common.parse_args(p, argv, STAGE)
    common.check_flags(args, width=">=1", topk_frac="(0,1]", threshold_quantile="[0,1]", anomaly_prob="[0,1]")
    if not 0 <= args.init_prior < 1:
        raise UserError(f"--init_prior must be in [0, 1) (got {args.init_prior})")
    if args.crd_norm != "none" and args.crd_input == "image":
        raise UserError("--crd_norm position divides the residuals: it needs --crd_input residual or both")
    return args


def parse_depths(text, depth):
    """--use_depths '1,3,5' -> [1, 3, 5], each in 1..N; None -> all of 1..N."""
    if text is None:
        return list(range(1, depth + 1))
    try:
        depths = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--use_depths {text!r}: give comma-separated depths, e.g. 1,3,5") from None
    if not depths or any(not 1 <= n <= depth for n in depths):
        raise UserError(f"--use_depths {text}: every depth must be in 1..{depth} (the RcAE's N)")
    if len(set(depths)) != len(depths):
        raise UserError(f"--use_depths {text}: a depth is repeated")
    return sorted(depths)  # the recursion axis runs from shallow to deep


def upstream(args):
    """The frozen RcAE and DPN; refuses a DPN trained on other RcAE weights than --rcae."""
    rcae, rcae_ck = upstream_rcae(args)  # fills args.rcae, inherits image_size/depth/holdout
    args.dpn = args.dpn or f"{args.out}/stage2_dpn.pt"
    dpn, dpn_ck = load_dpn(args.dpn)
    common.check_chain({"rcae": rcae_ck, "dpn": dpn_ck}, {"rcae": args.rcae, "dpn": args.dpn}, args.data)
    return rcae, dpn, {"rcae": str(Path(args.rcae).resolve()), "rcae_sha": common.fingerprint(rcae_ck["model"]),
                       "dpn": str(Path(args.dpn).resolve()), "dpn_sha": common.fingerprint(dpn_ck["model"])}


# ----------------------------------------------------------------------------- model


@dataclass
class Config:
    channels: int = 3  # C, inherited from the RcAE
    depth: int = 5  # N of the RcAE, inherited
    image_size: int = 1024  # training size, inherited
    width: int = 16  # base width w
    use_depths: list | None = None  # depths n on the recursion axis; None = all of 1..N (paper)
    crd_input: str = "image"  # each depth's I_D^n (paper), I - I_D^n, or I - I_R^n and I - I_D^n; next to I
    padding: str = "zeros"  # of the 3x3x3 convs (PADDINGS)
    norm: str = "none"  # NORMS: "position" divides the residuals by residual_scale, a buffer set before training

    def __post_init__(self):
        self.use_depths = list(self.use_depths or range(1, self.depth + 1))


INPUTS = {"image": 2, "residual": 2, "both": 3}  # --crd_input -> CRD's input channels per depth, in units of C


def residual_channels(kind, channels):
    """How many of CRD's input channels come before I (crd_input's layout): the residuals of "residual" and
    "both" (I_D^n itself for "image", which --crd_norm refuses)."""
    return (INPUTS[kind] - 1) * channels


# --crd_padding. Zero padding lets a CNN know where the image border is (and learn a rule for it); replicate
# padding extends the border's own values, so a pixel there looks like one inside (README, "Per defect kind").
PADDINGS = ("zeros", "replicate")
# --crd_norm. The normal residual is not the same everywhere (on magnetic_tile 1.7-2x as high at the border as
# inside): "position" divides each depth's residual by its normal level at that pixel relative to the image's
# mean level, measured on the training images, so a residual means the same at every place.
NORMS = ("none", "position")


def conv3(cin, cout, stride=1, padding="zeros"):
    """3x3x3 conv that keeps the recursion axis and strides only over H and W."""
    return nn.Conv3d(cin, cout, 3, (1, stride, stride), 1, padding_mode=padding)


def up_to(h, like):
    """Trilinear upsampling of h to the (NR, H, W) of the skip `like`: any H, W works."""
    return F.interpolate(h, size=like.shape[-3:], mode="trilinear", align_corners=False)


class CRD(nn.Module):
    """f_CRD of Eq. (8): (B, kC, NR, H, W) -> M_A (B, 1, H, W) in [0, 1], NR = len(use_depths)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        w, nr, conv = cfg.width, len(cfg.use_depths), partial(conv3, padding=cfg.padding)
        self.enc1 = conv(INPUTS[cfg.crd_input] * cfg.channels, w)  # (B, w, NR, H, W)
        self.enc2 = conv(w, 2 * w, stride=2)  # (B, 2w, NR, H/2, W/2)
        self.enc3 = conv(2 * w, 4 * w, stride=2)  # (B, 4w, NR, H/4, W/4)
        self.enc4 = conv(4 * w, 8 * w, stride=2)  # (B, 8w, NR, H/8, W/8)
        # decoder: halve the channels (1x1x1) before upsampling, concatenate the skip, 3x3x3 conv
        self.red3, self.dec3 = nn.Conv3d(8 * w, 4 * w, 1), conv(8 * w, 4 * w)
        self.red2, self.dec2 = nn.Conv3d(4 * w, 2 * w, 1), conv(4 * w, 2 * w)
        self.red1, self.dec1 = nn.Conv3d(2 * w, w, 1), conv(2 * w, w)
        # the recursion axis is reduced at the end by a learned weighting over the NR depths
        self.head = nn.Conv3d(w, 1, (nr, 1, 1))
        self.act = nn.LeakyReLU(0.1)
        if cfg.norm == "position":  # (1, 1, NR, H, W), set by residual_scale before training, saved with the weights
            self.register_buffer("residual_scale", torch.ones(1, 1, nr, cfg.image_size, cfg.image_size))

    memory_format = torch.channels_last_3d  # oneDNN's fast 3D layout: 1.4x on CPU (benchmarks/optimisations.py)

    def forward(self, x):
        """Eq. (8): M_A = sigmoid of the logits, (B, 1, H, W)."""
        return torch.sigmoid(self.logits(x))

    def logits(self, x):
        """(B, kC, NR, H, W) -> the logits of M_A, (B, 1, H, W)."""
        if self.cfg.norm == "position":
            r = residual_channels(self.cfg.crd_input, self.cfg.channels)
            x = torch.cat([x[:, :r] / self.residual_scale.to(x.dtype), x[:, r:]], 1)
        x = x.contiguous(memory_format=self.memory_format)
        e1 = self.act(self.enc1(x))  # (B, w, NR, H, W)
        e2 = self.act(self.enc2(e1))  # (B, 2w, NR, H/2, W/2)
        e3 = self.act(self.enc3(e2))  # (B, 4w, NR, H/4, W/4)
        e4 = self.act(self.enc4(e3))  # (B, 8w, NR, H/8, W/8)
        d3 = self.act(common.conv_cat(self.dec3, up_to(self.red3(e4), e3), e3))  # (B, 4w, NR, H/4, W/4)
        d2 = self.act(common.conv_cat(self.dec2, up_to(self.red2(d3), e2), e2))  # (B, 2w, NR, H/2, W/2)
        d1 = self.act(common.conv_cat(self.dec1, up_to(self.red1(d2), e1), e1))  # (B, w, NR, H, W)
        return self.head(d1)[:, :, 0]  # (B, 1, H, W), the recursion axis reduced


def crd_input(refined, image, depths, kind="image", recons=None):
    """I_D^n (+) I for each selected depth n, stacked on the recursion axis (kind "residual": I - I_D^n (+) I;
    "both": I - I_R^n (+) I - I_D^n (+) I, which needs recons).

    refined, recons (B, N, C, H, W) hold depths 1..N, image (B, C, H, W) -> (B, kC, NR, H, W), k = INPUTS[kind]."""
    idx = [n - 1 for n in depths]
    sel = refined[:, idx]  # (B, NR, C, H, W)
    if kind != "image":
        sel = image[:, None] - sel
    if kind == "both":  # what DPN restored is the difference of the two residuals: CRD sees it
        sel = torch.cat([image[:, None] - recons[:, idx], sel], 2)  # (B, NR, 2C, H, W)
    out = torch.cat([sel, image[:, None].expand(*sel.shape[:2], *image.shape[1:])], 2)  # (B, NR, kC, H, W)
    return out.transpose(1, 2)  # (B, kC, NR, H, W)


def frozen_forward(rcae, dpn, x, depths, kind="image"):
    """Stages 1-2 on x (B, C, H, W): recons {I_R^n} and refined {I_D^n} (B, N, C, H, W), and CRD's input."""
    recons = rcae.reconstruct_all(x)  # (B, N, C, H, W), n = 1..N
    refined = dpn.refine(recons, x)  # Eq. (6), (B, N, C, H, W)
    return recons, refined, crd_input(refined, x, depths, kind, recons)  # ..., (B, kC, NR, H, W)


@torch.no_grad()
def residual_scale(rcae, dpn, images, depths, kind, batch_size=8, device="cpu"):
    """--crd_norm position: per depth and pixel, the mean |residual| (channel mean) over the normal images,
    divided by its mean over the image, floored at 0.1: (1, 1, NR, H, W), 1 where the residual is as usual."""
    total = 0
    for i in range(0, len(images), batch_size):
        x = common.to_float(images[i:i + batch_size]).to(device)  # (B, C, H, W)
        inp = frozen_forward(rcae, dpn, x, depths, kind)[2].float()  # (B, kC, NR, H, W)
        total = total + inp[:, :residual_channels(kind, x.shape[1])].abs().mean(1, keepdim=True).sum(0, keepdim=True)
    level = total / len(images)  # (1, 1, NR, H, W)
    return (level / level.mean((-2, -1), keepdim=True)).clamp_min(0.1)


class Detector(nn.Module):
    """The trained chain RcAE -> DPN -> CRD, as evaluate.py, notebooks and benchmarks use it."""

    def __init__(self, rcae, dpn, crd, topk_frac=0.01, image_threshold=None, amp=1):
        super().__init__()
        self.rcae, self.dpn, self.crd = rcae, dpn, crd
        self.use_depths = list(crd.cfg.use_depths)
        self.topk_frac, self.image_threshold = topk_frac, image_threshold
        self.amp = amp  # stage 3's --amp: CRD sees its input in the precision it was trained on

    def forward(self, x):
        """x (B, C, H, W) in [0, 1] -> recons, refined (B, N, C, H, W) and map M_A (B, 1, H, W), float32.

        The precision path of stage 3's training loss: the frozen stages and CRD's logits under common.autocast
        (bf16 on CUDA with --amp 1), the sigmoid in float32."""
        with common.autocast(x.device, self.amp):
            recons, refined, inp = frozen_forward(self.rcae, self.dpn, x, self.use_depths, self.crd.cfg.crd_input)
            logits = self.crd.logits(inp)  # (B, 1, H, W)
        return {"recons": recons.float(), "refined": refined.float(), "map": torch.sigmoid(logits.float())}

    @torch.inference_mode()
    def predict(self, x):
        """forward() without autograd, plus the image score (B,): the top-k mean of the map."""
        out = self(x)
        out["score"] = common.topk_mean(out["map"], self.topk_frac)  # (B,)
        return out


# ----------------------------------------------------------------------------- loss


def crd_loss(logits, mask, kind="l2"):
    """Eq. (9): |M_A - M_P|_2 + |M_A' - M_P'|_2, each as a mean squared error (the paper's "l2" read as
    the squared norm, averaged like Eq. (5) and (7)). kind "bce" / "focal" replace the mask term by binary
    cross-entropy / focal loss (gamma 2) on the logits, which keep a gradient where the sigmoid saturates.
    logits, mask (B, 1, H, W). Returns (total, parts)."""
    # M_A. Past |logit| 30 the sigmoid's slope is below 1e-13: clamping there changes no gradient that
    # matters, and keeps a saturated L2 from sending denormal floats through the backward pass, which the
    # CPU's worker threads (not flushed to zero) then run many times slower (258 steps: 4 min -> 30 min)
    pred = torch.sigmoid(logits.clamp(-30, 30))
    mse_grad = (grad(pred) - grad(mask)).pow(2).mean()  # (B, 2, H, W) gradient maps
    if kind == "l2":
        term = (pred - mask).pow(2).mean()
    else:
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")  # (B, 1, H, W)
        term = (bce * (1 - torch.exp(-bce)).pow(2) if kind == "focal" else bce).mean()  # focal: (1 - p_t)^2 BCE
    return term + mse_grad, {kind: term.detach(), "mse_grad": mse_grad.detach()}


# ----------------------------------------------------------------------------- train


def make_batch(x, gen, anomaly_prob, anomaly_size="scaled", opacity="strong", anomaly_place="inside",
               anomaly_colour="uniform"):
    """x (B, C, H, W) clean -> images with pseudo anomalies and their masks M_P (all zero if untouched)."""
    images, masks = common.augment_batch(x, gen, anomaly_prob, anomaly_size, opacity, place=anomaly_place,
                                         colours=anomaly_colour)
    # images (B, C, H, W), masks (B, 1, H, W)
    return {"image": images, "mask": masks}


def loss_fn(net, b, rcae, dpn, depths, kind="image", loss="l2"):
    with torch.no_grad():  # RcAE and DPN are frozen: nothing flows back into them
        _, _, inp = frozen_forward(rcae, dpn, b["image"], depths, kind)  # (B, kC, NR, H, W)
    logits = net.logits(inp)  # under --compile 1 the wrapper forwards .logits to the original module (runs eager)
    return crd_loss(logits.float(), b["mask"], loss)


VAL_STREAM = "validation"  # the pseudo-anomaly stream of the validation: no training stage draws it


def validation_set(images, args, seed=0, kinds=common.ANOMALY_KINDS):
    """The holdout normal images (uint8 (M, C, H, W)) with pseudo anomalies on every image, drawn from a
    stream no training stage uses, with a fixed seed: the same set for every run with these settings. `kinds`:
    the pseudo-anomaly kinds drawn, all three as in training (benchmarks.revalidate also draws one at a time)."""
    gen = torch.Generator().manual_seed(common.stream_seed(VAL_STREAM, seed, 0))
    # images (M, C, H, W), masks (M, 1, H, W)
    return common.augment_batch(common.to_float(images), gen, 1.0, args.anomaly_size, args.opacity, kinds,
                                args.anomaly_place, args.anomaly_colour)


@torch.no_grad()
def validate(crd, rcae, dpn, val, batch_size=8, amp=1):
    """P-AUROC and AUPRO of CRD's map on the validation set: do the pseudo anomalies get found?
    (Not whether real defects do: that only the test split tells, and only evaluate.py reads it.)
    The same metrics of the residual |I - I_D^N| (the rcae+dpn variant, from the same forward pass, both
    maps unsmoothed) come beside them as "residual_*": the bar CRD has to clear."""
    import evaluate  # the one home of the metrics; imported here, as evaluate imports this file
    images, masks = val
    device = next(crd.parameters()).device
    detector, maps, res = Detector(rcae, dpn, crd, amp=amp), [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)  # (b, C, H, W)
        out = detector(x)
        maps.append(out["map"].cpu())  # (b, 1, H, W)
        res.append(evaluate.residual_map(x, out["refined"][:, -1], 0).cpu())  # (b, 1, H, W)
    masks = masks[:, 0].numpy()  # (M, H, W)
    val = {"anomalous_px": float(masks.mean())}
    for prefix, m in (("", maps), ("residual_", res)):
        m = torch.cat(m)[:, 0].numpy()  # (M, H, W)
        val.update({f"{prefix}p_auroc": evaluate.pixel_auroc(masks, m), f"{prefix}aupro": evaluate.aupro(masks, m)})
    return val


def calibrate(detector, images, args):
    """Score the holdout normal images (uint8 (M, C, H, W)); threshold = their --threshold_quantile."""
    device = next(detector.parameters()).device
    detector.eval()
    scores = []
    for i in range(0, len(images), args.batch_size):
        x = common.to_float(images[i:i + args.batch_size]).to(device)  # (b, C, H, W)
        scores += detector.predict(x)["score"].float().cpu().tolist()
    threshold = float(torch.quantile(torch.tensor(scores), args.threshold_quantile)) if scores else None
    if threshold is None:
        common.warn(f"no holdout images ({common.why_no_holdout(args.holdout)}): image_threshold is None; "
                    f"calibrate it elsewhere")
    return {"topk_frac": args.topk_frac, "quantile": args.threshold_quantile, "image_threshold": threshold,
            "holdout_scores": scores}


def main(argv=None):
    args = get_args(argv)
    rcae, dpn, ups = upstream(args)
    args.use_depths = parse_depths(args.use_depths, args.depth)
    common.seed_everything(args.seed)
    cfg = Config(channels=rcae.cfg.channels, depth=args.depth, image_size=args.image_size, width=args.width,
                 use_depths=args.use_depths, crd_input=args.crd_input, padding=args.crd_padding, norm=args.crd_norm)
    model = CRD(cfg)
    if args.init_prior:  # a start at the rare positives' rate instead of 0.5: no early collapse of every pixel to 0
        nn.init.constant_(model.head.bias, math.log(args.init_prior / (1 - args.init_prior)))
    device = common.get_device(args.device)
    rcae.to(device)
    dpn.to(device)
    images = common.train_images(args)  # (M, 3, H, W) uint8, the same train/good minus holdout as stage 1
    holdout = common.train_images(args, part="holdout")  # kept out of all training: validation, threshold
    path = f"{args.out}/{STAGE}.pt"
    if cfg.norm == "position" and (args.overwrite or not Path(path).is_file()):  # resuming loads the saved one
        model.residual_scale.copy_(residual_scale(rcae, dpn, images, cfg.use_depths, cfg.crd_input, args.batch_size,
                                                  device).cpu())
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, depths {cfg.use_depths} of N={cfg.depth}, "
          f"{common.n_params(model):,} parameters; RcAE {args.rcae} and DPN {args.dpn} frozen")

    common.check_upstream_unchanged(path, STAGE, ups, args)
    ck = common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images,
                      make_batch=partial(make_batch, **common.anomaly_kwargs(args)),
                      loss_fn=partial(loss_fn, rcae=rcae, dpn=dpn, depths=cfg.use_depths, kind=cfg.crd_input,
                                      loss=args.loss),
                      ckpt_path=path, extra={"upstream": ups},
                      validate=partial(validate, rcae=rcae, dpn=dpn, val=validation_set(holdout, args),
                                       batch_size=args.batch_size, amp=args.amp) if len(holdout) else None)

    # the threshold needs the trained CRD, so it is added to the final checkpoint afterwards (atomic rewrite)
    cal = calibrate(Detector(rcae, dpn, model, topk_frac=args.topk_frac, amp=args.amp), holdout, args)
    keep = {k: v for k, v in ck.items() if k not in ("stage", "model", "model_config", "args", "step", "version")}
    common.save_checkpoint(path, STAGE, model, ck["model_config"], args, ck["step"], **{**keep, "calibration": cal})
    print(f"{STAGE}: image threshold {cal['image_threshold']} = {cal['quantile']} quantile of "
          f"{len(cal['holdout_scores'])} holdout scores -> {path}")


def load_crd(path):
    """The frozen CRD and its checkpoint, rebuilt from the checkpoint alone."""
    ck = common.load_checkpoint(path, STAGE, hint="python stage3_crd.py --data PATH")
    return common.freeze(common.build_from_checkpoint(ck, CRD, Config)), ck


def load_chain(out, rcae=None, dpn=None, crd=None, data=None):
    """The one loader of the frozen chain: {stage: (model, ck)} in pipeline order, the stages trained so far.

    Each stage comes from its given path (which must exist), else <out>/<stage>.pt, else the path its
    downstream checkpoint recorded (a CRD trained with --out elsewhere and --rcae/--dpn from here, as for
    Table 6). No stage 1 is a UserError naming the command that makes it; a CRD without its DPN is
    dropped with a warning. Refuses a mixed-up chain (common.check_chain)."""
    given = {"crd": crd, "dpn": dpn, "rcae": rcae}
    loaders = {"crd": ("stage3_crd", load_crd), "dpn": ("stage2_dpn", load_dpn), "rcae": ("stage1_rcae", load_rcae)}
    found, paths, ups = {}, {}, {}
    for key, (stage, load) in loaders.items():
        path = Path(given[key] or Path(out) / f"{stage}.pt")
        if given[key] is None and not path.is_file() and Path(ups.get(key, "")).is_file():
            path = Path(ups[key])
        if given[key] is not None or path.is_file():
            found[key], paths[key] = load(str(path)), str(path)
            ups = {**found[key][1].get("upstream", {}), **ups}
    if "rcae" not in found:
        raise UserError(f"no stage1_rcae.pt in {out}: run `python stage1_rcae.py --data {data or 'PATH'}` first "
                        f"(or point --out at the folder that holds it)")
    if "crd" in found and "dpn" not in found:
        common.warn(f"{paths.pop('crd')} is ignored: CRD reads DPN output and stage2_dpn.pt is missing")
        found.pop("crd")
    chain = {loaders[k][0]: found[k] for k in ("rcae", "dpn", "crd") if k in found}
    for stage, (_, ck) in chain.items():
        if ck["step"] < ck.get("total_steps", 0):
            common.warn(f"{paths[stage.split('_')[1]]} is an unfinished run ({ck['step']} of {ck['total_steps']} steps)")
    common.check_chain({k: found[k][1] for k in ("rcae", "dpn", "crd") if k in found}, paths, data)
    return chain


def detector_of(chain):
    """The Detector of a loaded chain with all three stages, with stage 3's calibrated top-k and threshold."""
    crd, ck = chain["stage3_crd"]
    cal = ck.get("calibration") or {}
    return common.freeze(Detector(chain["stage1_rcae"][0], chain["stage2_dpn"][0], crd,
                                  topk_frac=cal.get("topk_frac", ck["args"]["topk_frac"]),
                                  image_threshold=cal.get("image_threshold"), amp=ck["args"].get("amp", 1)))


def crd_of(chain, out):
    """(CRD, checkpoint) of a chain from load_chain; a chain without a usable CRD is a UserError."""
    if "stage3_crd" not in chain:
        raise UserError(f"no usable stage3_crd.pt in {out}: run `python stage3_crd.py --data PATH` first")
    return chain["stage3_crd"]


def load_detector(out, rcae=None, dpn=None, crd=None):
    """The frozen Detector from <out>/stage{1,2,3}_*.pt (or the given paths); refuses a mixed-up chain."""
    chain = load_chain(out, rcae, dpn, crd)
    crd_of(chain, out)
    return detector_of(chain)


if __name__ == "__main__":
    common.run_main(main)
