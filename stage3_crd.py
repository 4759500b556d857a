"""Stage 3: Cross Recursion Detection (CRD), paper "Cross Recursion Detection", Eq. (8)-(9).

Normal regions settle after a few recursion steps, anomalies keep changing. CRD, a 4-level 3D conv
U-Net, looks at every depth's detail-enhanced reconstruction next to the input at once (the recursion
axis is the 3D convolutions' third axis) and predicts the anomaly map:

    M_A   = f_CRD(I_D^n (+) I),  n in use_depths (all of 1..N by default)            Eq. (8)
    L_CRD = |M_A - M_P|_2 + |M_A' - M_P'|_2                                           Eq. (9)

RcAE and DPN are frozen; the input has pseudo anomalies (mask M_P) part of the time. The image score
is the mean of the top --topk_frac of M_A's pixels. After training, the holdout normal images (train/good
kept out of every stage's training, never the test split) are scored, and their --threshold_quantile
is stored in the checkpoint as the image threshold. `load_chain` rebuilds the chain (or the part of it
that is trained) for evaluate.py; `load_detector` the whole Detector for notebooks and your own code.
The CPU recipe feeds each depth as its residual I - I_D^n next to I (--crd_input residual), divided by its
normal level at each pixel (--residual_scale position), and trains with a focal mask term
(docs/reading_the_paper.md).

GPU (paper settings):  python stage3_crd.py --data mvtec/bottle
CPU recipe:            python stage3_crd.py --data mvtec/bottle --recipe cpu
Table 6 (N_R = 3):     python stage3_crd.py --data mvtec/bottle --use_depths 1,3,5 --out runs/mvtec/bottle_nr3 \
                           --rcae runs/mvtec/bottle/stage1_rcae.pt --dpn runs/mvtec/bottle/stage2_dpn.pt
Reads:  <out>/stage1_rcae.pt (--rcae) and <out>/stage2_dpn.pt (--dpn), both from the same RcAE;
        image size, depth, holdout, resize and train fraction are inherited from them. The training images of stage 1.
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
import metrics
from common import UserError, image_gradient
from stage1_rcae import load_rcae
from stage2_dpn import load_dpn, upstream_rcae

STAGE = "stage3_crd"
INPUTS = ("refined", "residual")  # --crd_input: each depth as I_D^n (Eq. (8)) or as I - I_D^n, next to I


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    g = common.add_shared_args(p, first=False, epochs=300)  # paper: 300 epochs
    g["data"].add_argument("--rcae", help="stage-1 checkpoint, frozen (default: <out>/stage1_rcae.pt)")
    g["data"].add_argument("--dpn", help="stage-2 checkpoint of the same RcAE, frozen (default: <out>/stage2_dpn.pt)")
    common.add_anomaly_args(g["data"], "chance that a training image gets pseudo anomalies, else an all-zero mask "
                                       "(paper: not given)")
    m = g["model"]
    m.add_argument("--width", type=int, default=16, help="CRD base width w; levels have w, 2w, 4w, 8w (paper: not "
                                                         "given)")
    m.add_argument("--use_depths", help="recursion depths fed to CRD, comma-separated, e.g. 1,3,5 (default: all of "
                                        "1..N, as in the paper; its Table 6 ablates 5 and 1,3,5)")
    m.add_argument("--crd_input", choices=INPUTS, default="refined",
                   help="what CRD reads of each depth next to I: refined, I_D^n itself (paper, Eq. (8)), or residual, "
                        "I - I_D^n: the same information with the difference already taken")
    m.add_argument("--residual_scale", choices=["none", "position"], default="none",
                   help="none (paper), or position: each depth's residual divided by its normal level at that pixel "
                        "relative to the image's mean, measured on the training images (needs --crd_input residual)")
    m.add_argument("--topk_frac", type=float, default=0.01,
                   help="image score = mean of this top fraction of M_A's pixels (paper: top-k mean, k not given)")
    m.add_argument("--threshold_quantile", type=float, default=0.99,
                   help="image threshold = this quantile of the holdout normal scores (paper: not given)")
    g["loss"].add_argument("--loss", choices=["l2", "focal"], default="l2",
                           help="mask term of Eq. (9): l2 (paper) or focal (gamma 2, DRAEM) on the logits; the edge "
                                "term stays L2")
    g["loss"].add_argument("--init_prior", type=float, default=0.0,
                           help="start M_A at this anomalous-pixel rate (the head's bias = its logit, as RetinaNet "
                                "does for rare positives); 0 = PyTorch's default init (paper: not given)")
    args = common.parse_args(p, argv, STAGE)
    common.check_flags(args, topk_frac="(0,1]", threshold_quantile="[0,1]", init_prior="[0,1)")
    if args.residual_scale != "none" and args.crd_input != "residual":
        raise UserError("--residual_scale position divides the residuals: it needs --crd_input residual")
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


CHAIN = {"rcae": ("RcAE", "stage1_rcae.py"), "dpn": ("DPN", "stage2_dpn.py"), "crd": ("CRD", "stage3_crd.py")}


def check_chain(cks, paths, data=None):
    """The one upstream check of the stage chain (stage 3's training, load_chain): each later checkpoint of
    cks = {"rcae": ck, "dpn": ck, "crd": ck} (pipeline order, any prefix) was trained for the RcAE's depth and image
    size and on the very weights of the earlier ones, loaded from paths[name]."""
    names = list(cks)
    size, depth = (cks[names[0]]["model_config"][k] for k in ("image_size", "depth"))
    for i, name in enumerate(names[1:], start=1):
        cfg, retrain = cks[name]["model_config"], f"`python {CHAIN[name][1]} --data {data or 'PATH'} --overwrite`"
        if cfg["depth"] != depth or cfg["image_size"] != size:
            raise UserError(f"{paths[name]} was trained for depth {cfg['depth']} at {cfg['image_size']}px, "
                            f"the RcAE {paths[names[0]]} for depth {depth} at {size}px: retrain it with {retrain}")
        ups = cks[name].get("upstream", {})
        bad = [k for k in names[:i] if f"{k}_sha" in ups and common.fingerprint(cks[k]["model"]) != ups[f"{k}_sha"]]
        if bad:
            raise UserError(f"{paths[name]} was trained on the {CHAIN[bad[0]][0]} {ups[bad[0]]}, not on the weights "
                            f"in {paths[bad[0]]} (an upstream stage was retrained): pass the matching --{bad[0]}, or "
                            f"retrain it with {retrain}")


def upstream(args):
    """The frozen RcAE and DPN; refuses a DPN trained on other RcAE weights than --rcae."""
    rcae, rcae_ck = upstream_rcae(args)  # fills args.rcae, inherits common.INHERITED
    args.dpn = args.dpn or f"{args.out}/stage2_dpn.pt"
    dpn, dpn_ck = load_dpn(args.dpn)
    check_chain({"rcae": rcae_ck, "dpn": dpn_ck}, {"rcae": args.rcae, "dpn": args.dpn}, args.data)
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
    crd_input: str = "refined"  # INPUTS: each depth as I_D^n (paper) or as I - I_D^n, next to I
    residual_scale: str = "none"  # "position": residuals divided by position_scale, a buffer set before training

    def __post_init__(self):
        self.use_depths = list(self.use_depths or range(1, self.depth + 1))


def conv3(cin, cout, stride=1):
    """3x3x3 conv that keeps the recursion axis and strides only over H and W."""
    return nn.Conv3d(cin, cout, 3, (1, stride, stride), 1)


def up_to(h, like):
    """Trilinear upsampling of h to the (NR, H, W) of the skip `like`: any H, W works."""
    return F.interpolate(h, size=like.shape[-3:], mode="trilinear", align_corners=False)


class CRD(nn.Module):
    """f_CRD of Eq. (8): (B, 2C, NR, H, W) -> M_A (B, 1, H, W) in [0, 1], NR = len(use_depths)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        w, nr = cfg.width, len(cfg.use_depths)
        self.enc1 = conv3(2 * cfg.channels, w)  # (B, w, NR, H, W)
        self.enc2 = conv3(w, 2 * w, stride=2)  # (B, 2w, NR, H/2, W/2)
        self.enc3 = conv3(2 * w, 4 * w, stride=2)  # (B, 4w, NR, H/4, W/4)
        self.enc4 = conv3(4 * w, 8 * w, stride=2)  # (B, 8w, NR, H/8, W/8)
        # decoder: halve the channels (1x1x1) before upsampling, concatenate the skip, 3x3x3 conv
        self.red3, self.dec3 = nn.Conv3d(8 * w, 4 * w, 1), conv3(8 * w, 4 * w)
        self.red2, self.dec2 = nn.Conv3d(4 * w, 2 * w, 1), conv3(4 * w, 2 * w)
        self.red1, self.dec1 = nn.Conv3d(2 * w, w, 1), conv3(2 * w, w)
        # the recursion axis is reduced at the end by a learned weighting over the NR depths
        self.head = nn.Conv3d(w, 1, (nr, 1, 1))
        self.act = nn.LeakyReLU(0.1)
        if cfg.residual_scale == "position":  # (1, 1, NR, H, W): set by position_scale before training, saved
            self.register_buffer("position_scale", torch.ones(1, 1, nr, cfg.image_size, cfg.image_size))

    memory_format = torch.channels_last_3d  # oneDNN's fast 3D layout: 1.4x on CPU (benchmarks/README.md)

    def forward(self, x):
        """Eq. (8): M_A = sigmoid of the logits, (B, 1, H, W)."""
        return torch.sigmoid(self.logits(x))

    def logits(self, x):
        """(B, 2C, NR, H, W) -> the logits of M_A, (B, 1, H, W)."""
        if self.cfg.residual_scale == "position":  # the residual channels [:C] measured in their normal level
            c = self.cfg.channels
            x = torch.cat([x[:, :c] / self.position_scale.to(x.dtype), x[:, c:]], 1)
        x = x.contiguous(memory_format=self.memory_format)
        e1 = self.act(self.enc1(x))  # (B, w, NR, H, W)
        e2 = self.act(self.enc2(e1))  # (B, 2w, NR, H/2, W/2)
        e3 = self.act(self.enc3(e2))  # (B, 4w, NR, H/4, W/4)
        e4 = self.act(self.enc4(e3))  # (B, 8w, NR, H/8, W/8)
        d3 = self.act(common.conv_cat(self.dec3, up_to(self.red3(e4), e3), e3))  # (B, 4w, NR, H/4, W/4)
        d2 = self.act(common.conv_cat(self.dec2, up_to(self.red2(d3), e2), e2))  # (B, 2w, NR, H/2, W/2)
        d1 = self.act(common.conv_cat(self.dec1, up_to(self.red1(d2), e1), e1))  # (B, w, NR, H, W)
        return self.head(d1)[:, :, 0]  # (B, 1, H, W), the recursion axis reduced


def crd_input(refined, image, depths, kind="refined"):
    """Eq. (8)'s I_D^n (+) I for each selected depth n, stacked on the recursion axis (kind "residual":
    (I - I_D^n) (+) I). refined (B, N, C, H, W) holds depths 1..N, image (B, C, H, W) -> (B, 2C, NR, H, W)."""
    sel = refined[:, [n - 1 for n in depths]]  # (B, NR, C, H, W)
    if kind == "residual":
        sel = image[:, None] - sel
    out = torch.cat([sel, image[:, None].expand_as(sel)], 2)  # (B, NR, 2C, H, W)
    return out.transpose(1, 2)  # (B, 2C, NR, H, W)


def frozen_forward(rcae, dpn, x, depths, kind="refined"):
    """Stages 1-2 on x (B, C, H, W): recons {I_R^n} and refined {I_D^n} (B, N, C, H, W), and CRD's input."""
    recons = rcae.reconstruct_all(x)  # (B, N, C, H, W), n = 1..N, Eq. (3)-(4)
    refined = dpn.refine(recons, x)  # Eq. (6), (B, N, C, H, W)
    return recons, refined, crd_input(refined, x, depths, kind)  # ..., (B, 2C, NR, H, W)


@torch.no_grad()
def position_scale(rcae, dpn, images, depths, batch_size=8, device="cpu"):
    """--residual_scale position: per depth and pixel, the mean |I - I_D^n| (channel mean) over the normal training
    images (uint8 (M, C, H, W)), divided by its mean over the image, floored at 0.1 -> (1, 1, NR, H, W), 1 where the
    residual is as large as usual. (The normal residual is not the same everywhere: on magnetic_tile 1.7-2x as high
    at the border as inside.)"""
    total = 0
    for i in range(0, len(images), batch_size):
        x = common.to_float(images[i:i + batch_size]).to(device)  # (B, C, H, W)
        inp = frozen_forward(rcae, dpn, x, depths, "residual")[2].float()  # (B, 2C, NR, H, W)
        total = total + inp[:, :x.shape[1]].abs().mean(1, keepdim=True).sum(0, keepdim=True)
    level = total / len(images)  # (1, 1, NR, H, W)
    return (level / level.mean((-2, -1), keepdim=True)).clamp_min(0.1)


def topk_mean(maps, frac):
    """Image score: the mean of the top `frac` of each map's pixels (paper: "averaging the top-k pixel scores",
    k not given). maps (B, 1, H, W) or (B, H, W) -> (B,)."""
    flat = maps.reshape(len(maps), -1)
    return flat.topk(max(1, round(frac * flat.shape[1])), dim=1).values.mean(1)


class Detector(nn.Module):
    """The trained chain RcAE -> DPN -> CRD, as evaluate.py, notebooks and your own code use it."""

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
        out["score"] = topk_mean(out["map"], self.topk_frac)  # (B,)
        return out


# ----------------------------------------------------------------------------- loss


def crd_loss(logits, mask, kind="l2"):
    """Eq. (9): |M_A - M_P|_2 + |M_A' - M_P'|_2, each as a mean squared error (the paper's "l2" read as the squared
    norm, averaged like Eq. (5) and (7)). kind "focal" (the CPU recipe) replaces the mask term by the focal loss
    (gamma 2) on the logits, which keeps a gradient where the sigmoid saturates. logits, mask (B, 1, H, W).
    Returns (total, parts)."""
    # M_A. Past |logit| 30 the sigmoid's slope is below 1e-13: clamping there changes no gradient that
    # matters, and keeps a saturated L2 from sending denormal floats through the backward pass, which the
    # CPU's worker threads (not flushed to zero) then run many times slower (258 steps: 4 min -> 30 min)
    pred = torch.sigmoid(logits.clamp(-30, 30))
    mse_grad = (image_gradient(pred) - image_gradient(mask)).pow(2).mean()  # Eq. (9) edge term, (B, 2, H, W) maps
    if kind == "l2":
        term = (pred - mask).pow(2).mean()  # Eq. (9) mask term
    else:
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")  # (B, 1, H, W)
        term = (bce * (1 - torch.exp(-bce)).pow(2)).mean()  # focal: (1 - p_t)^2 BCE
    return term + mse_grad, {kind: term.detach(), "mse_grad": mse_grad.detach()}


# ----------------------------------------------------------------------------- train


def make_batch(x, gen, anomaly_prob, anomaly_size="scaled", anomaly_colour="uniform"):
    """x (B, C, H, W) clean -> images with pseudo anomalies (B, C, H, W) and their masks M_P (B, 1, H, W), all zero
    where untouched."""
    images, masks = common.augment_batch(x, gen, anomaly_prob, anomaly_size, anomaly_colour)
    return {"image": images, "mask": masks}


def loss_fn(net, b, rcae, dpn, depths, kind="refined", loss="l2"):
    with torch.no_grad():  # RcAE and DPN are frozen: nothing flows back into them
        _, _, inp = frozen_forward(rcae, dpn, b["image"], depths, kind)  # (B, 2C, NR, H, W)
    logits = net.logits(inp)  # under --compile 1 the wrapper forwards .logits to the original module (runs eager)
    return crd_loss(logits.float(), b["mask"], loss)


VAL_STREAM = "validation"  # the pseudo-anomaly stream of the validation: no training stage draws it


def validation_set(images, args, seed=0):
    """The holdout normal images (uint8 (M, C, H, W)) with pseudo anomalies on every image, drawn from a stream
    no training stage uses, with a fixed seed: the same set for every run with these settings.
    -> (images (M, C, H, W), masks (M, 1, H, W))."""
    gen = torch.Generator().manual_seed(common.stream_seed(VAL_STREAM, seed, 0))
    return common.augment_batch(common.to_float(images), gen, 1.0, args.anomaly_size, args.anomaly_colour)


@torch.no_grad()
def validate(crd, rcae, dpn, val, batch_size=8, amp=1):
    """P-AUROC and AUPRO of CRD's map on the validation set: do the pseudo anomalies get found? (Not whether real
    defects do: only the test split tells, and only evaluate.py reads it.) The same metrics of the residual
    |I - I_D^N| (the rcae+dpn variant, unsmoothed, from the same pass) come beside them as "residual_*": the bar
    CRD has to clear."""
    images, masks = val
    device = next(crd.parameters()).device
    detector, maps, res = Detector(rcae, dpn, crd, amp=amp), [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)  # (b, C, H, W)
        out = detector(x)
        maps.append(out["map"].cpu())  # (b, 1, H, W)
        res.append((x - out["refined"][:, -1]).abs().mean(1, keepdim=True).cpu())  # (b, 1, H, W)
    masks = masks[:, 0].numpy()  # (M, H, W)
    val = {"anomalous_px": float(masks.mean())}
    for prefix, m in (("", maps), ("residual_", res)):
        m = torch.cat(m)[:, 0].numpy()  # (M, H, W)
        val.update({f"{prefix}p_auroc": metrics.pixel_auroc(masks, m), f"{prefix}aupro": metrics.aupro(masks, m)})
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
        why = "--holdout 0" if not args.holdout else f"train/good too small to keep a --holdout {args.holdout} of it"
        common.warn(f"no holdout images ({why}): image_threshold is None; calibrate it elsewhere")
    return {"topk_frac": args.topk_frac, "quantile": args.threshold_quantile, "image_threshold": threshold,
            "holdout_scores": scores}


def main(argv=None):
    args = get_args(argv)
    rcae, dpn, ups = upstream(args)
    args.use_depths = parse_depths(args.use_depths, args.depth)
    torch.manual_seed(args.seed)
    cfg = Config(channels=rcae.cfg.channels, depth=args.depth, image_size=args.image_size, width=args.width,
                 use_depths=args.use_depths, crd_input=args.crd_input, residual_scale=args.residual_scale)
    model = CRD(cfg)
    if args.init_prior:  # a start at the rare positives' rate instead of 0.5: no early collapse of every pixel to 0
        nn.init.constant_(model.head.bias, math.log(args.init_prior / (1 - args.init_prior)))
    device = common.get_device(args.device)
    rcae.to(device)
    dpn.to(device)
    images = common.train_images(args)  # (M, 3, H, W) uint8, the same train/good minus holdout as stage 1
    holdout = common.train_images(args, part="holdout")  # kept out of all training: validation, threshold
    path = f"{args.out}/{STAGE}.pt"
    if cfg.residual_scale == "position" and (args.overwrite or not Path(path).is_file()):  # a resumed run has it
        model.position_scale.copy_(position_scale(rcae, dpn, images, cfg.use_depths, args.batch_size, device).cpu())
    print(f"{STAGE}: {len(images)} training images at {args.image_size}px, depths {cfg.use_depths} of N={cfg.depth}, "
          f"{common.n_params(model):,} parameters; RcAE {args.rcae} and DPN {args.dpn} frozen")
    ck = common.train(stage=STAGE, model=model, model_config=asdict(cfg), args=args, images=images,
                      make_batch=partial(make_batch, anomaly_prob=args.anomaly_prob, anomaly_size=args.anomaly_size,
                                         anomaly_colour=args.anomaly_colour),
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
    return common.build_from_checkpoint(ck, CRD, Config), ck


def load_chain(out, rcae=None, dpn=None, crd=None, data=None):
    """The one loader of the frozen chain: {stage: (model, ck)} in pipeline order, the stages trained so far.

    Each stage comes from its given path (which must exist), else <out>/<stage>.pt, else the path its
    downstream checkpoint recorded (a CRD trained with --out elsewhere and --rcae/--dpn from here, as for
    Table 6). No stage 1 is a UserError naming the command that makes it; a CRD without its DPN is
    dropped with a warning. Refuses a mixed-up chain (check_chain)."""
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
    check_chain({k: found[k][1] for k in ("rcae", "dpn", "crd") if k in found}, paths, data)
    return chain


def detector_of(chain):
    """The Detector of a loaded chain with all three stages, with stage 3's calibrated top-k and threshold."""
    crd, ck = chain["stage3_crd"]
    cal = ck.get("calibration") or {}
    return Detector(chain["stage1_rcae"][0], chain["stage2_dpn"][0], crd, cal.get("topk_frac", ck["args"]["topk_frac"]),
                    cal.get("image_threshold"), ck["args"]["amp"]).eval()


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
