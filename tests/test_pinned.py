"""Pinned: what a plain command trains (every default, the paper's values, the cpu recipe) and the full pipeline's
outputs on a fixed input.

Speed work must not change results: an optimisation such as a memory-format change, fused ops or a different
thread setting must keep the outputs within float noise. A changed default must change this file deliberately."""
from dataclasses import fields

import pytest
import torch

import common
import stage1_rcae
import stage2_dpn
import stage3_crd

STAGES = (stage1_rcae, stage2_dpn, stage3_crd)

# every flag of `python <stage>.py --data X` (all but --data and --out), as parsed
PLAIN = {
    "stage1_rcae": dict(image_size=1024, resize="squash", holdout=0.1, train_fraction=1.0, depth=5, epochs=1500,
                        max_steps=None, batch_size=8, lr=1e-4, recipe="paper", device="auto", seed=0, amp=1,
                        compile=0, save_every=500, overwrite=False, width=32, standardise=1, updown_init="default",
                        arch="rcae", share=1, skip=1, ema=0.0, anomaly_prob=0.5, anomaly_size="scaled",
                        anomaly_colour="uniform"),
    "stage2_dpn": dict(epochs=400, max_steps=None, batch_size=8, lr=1e-4, recipe="paper", device="auto", seed=0,
                       amp=1, compile=0, save_every=500, overwrite=False, rcae=None, width=32),
    "stage3_crd": dict(epochs=300, max_steps=None, batch_size=8, lr=1e-4, recipe="paper", device="auto", seed=0, amp=1,
                       compile=0, save_every=500, overwrite=False, rcae=None, dpn=None, anomaly_prob=0.5,
                       anomaly_size="scaled", anomaly_colour="uniform", width=16, use_depths=None,
                       crd_input="refined", residual_scale="none", topk_frac=0.01, threshold_quantile=0.99,
                       loss="l2", init_prior=0.0),
}

# the values the paper states, which a plain command (no --recipe) must use
PAPER = {
    "stage1_rcae": dict(image_size=1024, depth=5, epochs=1500, lr=1e-4, max_steps=None, arch="rcae", share=1, skip=1,
                        ema=0.0, anomaly_size="scaled", resize="squash", train_fraction=1.0),
    "stage2_dpn": dict(epochs=400, lr=1e-4, max_steps=None),
    "stage3_crd": dict(epochs=300, lr=1e-4, max_steps=None, crd_input="refined", loss="l2", use_depths=None,
                       residual_scale="none", anomaly_size="scaled"),
}

# --recipe cpu: what works at a CPU's budget (docs/reading_the_paper.md)
CPU = {
    "stage1_rcae": dict(image_size=128, lr=1e-3, max_steps=1758, updown_init="pca", ema=0.99, anomaly_colour="image"),
    "stage2_dpn": dict(lr=1e-3, max_steps=263),
    "stage3_crd": dict(lr=1e-3, max_steps=258, crd_input="residual", residual_scale="position", loss="focal",
                       init_prior=0.01, anomaly_size="relative", anomaly_colour="image"),
}


def parsed(stage, *flags):
    """The flags of `python <stage>.py --data x *flags`, but --data and --out."""
    args = vars(stage.get_args(["--data", "x", *flags]))
    assert args.pop("data") == "x" and args.pop("out") == common.default_out("x")
    return args


def test_a_plain_command_trains_the_pinned_defaults():
    for stage in STAGES:
        assert parsed(stage) == PLAIN[stage.STAGE], stage.STAGE


def test_a_plain_command_uses_every_value_the_paper_states():
    for stage in STAGES:
        args = parsed(stage)
        assert args["recipe"] == "paper" and {k: args[k] for k in PAPER[stage.STAGE]} == PAPER[stage.STAGE]


def test_the_cpu_recipe_is_pinned_and_changes_only_its_values():
    assert common.RECIPES == {"paper": {}, "cpu": CPU}
    for stage in STAGES:
        assert parsed(stage, "--recipe", "cpu") == {**PLAIN[stage.STAGE], **CPU[stage.STAGE], "recipe": "cpu"}
        explicit = parsed(stage, "--recipe", "cpu", "--lr", "0.5")  # an explicit flag still wins
        assert explicit["lr"] == 0.5 and explicit["max_steps"] == CPU[stage.STAGE]["max_steps"]


def config_of(stage, args, stage1_args):
    """The stage's Config with every field set from the parsed command line: its own flag, or the stage-1 flag it
    inherits (common.INHERITED); the one field without a flag, channels, is 3 (RGB)."""
    values = {}
    for f in fields(stage.Config):
        if f.name in args:
            values[f.name] = args[f.name]
        elif f.name in common.INHERITED:
            values[f.name] = stage1_args[f.name]
        else:
            assert f.name == "channels", f"{stage.STAGE}.Config.{f.name} has no command-line flag"
            values[f.name] = 3
    return stage.Config(**values)


def test_every_config_default_is_its_command_line_default():
    """A model built from a Config's defaults (notebooks, tests, your own code) is the model a plain command trains."""
    stage1_args = parsed(stage1_rcae)
    for stage in STAGES:
        assert stage.Config() == config_of(stage, parsed(stage), stage1_args), stage.STAGE
    assert stage3_crd.Config().use_depths == stage3_crd.parse_depths(None, stage1_args["depth"]) == [1, 2, 3, 4, 5]


# key: (sum, max |v|, every 997th value [:4])
PINNED = {  # recorded from the plain (unoptimised) implementation: small models (depth 3, widths 8/8/4)
    "recons": (-2345.99367899308, 0.24828365445137024, [0.08322275429964066, 0.07865425199270248, 0.07405626773834229, 0.09666593372821808]),
    "refined": (-1886.2253078989888, 0.4872836470603943, [0.03456093743443489, 0.16050533950328827, 0.04103183001279831, 0.11154893785715103]),
    "map": (4120.788041114807, 0.5093093514442444, [0.5039027333259583, 0.5033378601074219, 0.5006092190742493, 0.5003920197486877]),
    "score": (1.0150572061538696, 0.5075874328613281, [0.5075874328613281]),
}
PINNED_PLAIN = {  # the models of a plain command (depth 5, widths 32/32/16), recorded after PINNED still held
    "recons": (11584.939652185887, 0.2687540054321289, [0.2402316927909851, 0.1916068196296692, 0.22364787757396698, 0.2637096047401428]),
    "refined": (26426.927893878892, 0.7412906885147095, [0.22942347824573517, 0.452206552028656, 0.43922263383865356, 0.5566468834877014]),
    "map": (4173.048876225948, 0.5204675197601318, [0.5095400214195251, 0.509499728679657, 0.5034821629524231, 0.5075066089630127]),
    "score": (1.0335028171539307, 0.517042875289917, [0.517042875289917]),
}


def check_pipeline(configs, pinned):
    torch.manual_seed(0)
    rcae = stage1_rcae.RcAE(configs[0])
    dpn = stage2_dpn.DPN(configs[1])
    torch.nn.init.normal_(dpn.ae.dec1.weight, std=0.05)  # a non-zero residual, so DPN's output is pinned too
    crd = stage3_crd.CRD(configs[2])
    det = stage3_crd.Detector(rcae.eval(), dpn.eval(), crd.eval())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = det.predict(x)
    for k, (total, peak, samples) in pinned.items():
        v = out[k].double()
        assert v.sum().item() == pytest.approx(total, rel=1e-4, abs=1e-3), k
        assert v.abs().max().item() == pytest.approx(peak, rel=1e-4), k
        assert v.flatten()[::997][:4].tolist() == pytest.approx(samples, rel=1e-4, abs=1e-5), k


def test_pipeline_outputs_are_pinned():
    check_pipeline([stage1_rcae.Config(depth=3, width=8), stage2_dpn.Config(depth=3, width=8),
                    stage3_crd.Config(depth=3, width=4)], PINNED)


def test_pipeline_outputs_of_a_plain_command_are_pinned():
    stage1_args = parsed(stage1_rcae)
    check_pipeline([config_of(stage, parsed(stage), stage1_args) for stage in STAGES], PINNED_PLAIN)
