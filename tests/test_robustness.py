"""What a user sees when things go wrong: interrupts, time-based checkpoints, bad flags, bad checkpoints."""
import os
import signal

import pytest
import torch
from conftest import quick_args

import common
import stage1_rcae
import stage2_dpn
import stage3_crd
import synth

UPSTREAM = dict(image_size=None, depth=None)  # stages 2 and 3 inherit them from the stage-1 checkpoint


def run(argv, main=stage1_rcae.main):
    """A script's main under run_main, as on the command line: -> exit code."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(argv))
    return e.value.code


def saves_of(monkeypatch):
    """Record the step of every checkpoint common.train writes."""
    steps, real = [], common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda *a, **k: (steps.append(a[5]), real(*a, **k)))
    return steps


# ----------------------------------------------------------------------------- checkpoints and interrupts


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
    """common.atomic_open (every checkpoint, metrics.json, results.md/csv, benchmark JSON): a write that fails
    half way keeps the old file and leaves no temp file; write_json writes nan as null (valid JSON)."""
    path = tmp_path / "sub" / "metrics.json"
    common.write_json(path, {"auroc": float("nan"), "rows": (1.5, float("nan"))})
    assert path.read_text().split() == '{ "auroc": null, "rows": [ 1.5, null ] }'.split()
    with pytest.raises(KeyboardInterrupt), common.atomic_open(path) as f:
        f.write("half of a new file")
        raise KeyboardInterrupt
    assert '"auroc": null' in path.read_text() and os.listdir(path.parent) == ["metrics.json"]


def test_checkpoint_every_few_minutes_of_wall_time(toy_data, tmp_path, monkeypatch):
    """Besides every --save_every steps, common.train saves when common.SAVE_MINUTES have passed since the last save."""
    steps = saves_of(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(common, "SAVE_MINUTES", 1e-9)
        stage1_rcae.main(quick_args(toy_data, tmp_path / "a", max_steps=4, save_every=1000))
    assert steps == [1, 2, 3, 4]  # every step is "minutes" after the last save; the last one is the final save
    steps.clear()
    stage1_rcae.main(quick_args(toy_data, tmp_path / "b", max_steps=4, save_every=1000))
    assert steps == [4]


def interrupt_at(monkeypatch, call, how):
    """Make stage 1's loss interrupt the run at its `call`-th call: raise Ctrl-C's KeyboardInterrupt in the
    middle of the step, or send this process SIGTERM (the step then finishes)."""
    real, calls = stage1_rcae.recon_loss, []

    def loss(recon, target):
        calls.append(1)
        if len(calls) == call:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(recon, target)

    monkeypatch.setattr(stage1_rcae, "recon_loss", loss)


def test_ctrl_c_saves_the_last_finished_step(toy_data, tmp_path, monkeypatch, capsys):
    stage1_rcae.main(quick_args(toy_data, tmp_path / "straight", max_steps=2))
    interrupt_at(monkeypatch, 3, "raise")  # steps 1 and 2 finished, step 3 in flight
    assert run(quick_args(toy_data, tmp_path / "cut", max_steps=5, save_every=1000)) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT after step 2" in err and "holds step 2 of 5" in err and "resume" in err
    cut = torch.load(tmp_path / "cut" / "stage1_rcae.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "stage1_rcae.pt", weights_only=True)
    assert cut["step"] == 2 and "optimizer" in cut  # resumable
    for k in straight["model"]:
        assert torch.equal(cut["model"][k], straight["model"][k]), k


def test_ctrl_c_before_the_first_step_says_nothing_was_saved(toy_data, tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 1, "raise")
    assert run(quick_args(toy_data, tmp_path, max_steps=5)) == 130
    assert "nothing of this run was saved" in capsys.readouterr().err
    assert not (tmp_path / "stage1_rcae.pt").exists()


def test_sigterm_finishes_the_step_saves_it_and_exits_143(toy_data, tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, 2, "signal")  # SIGTERM arrives during step 2, which still finishes
    assert run(quick_args(toy_data, tmp_path, max_steps=5, save_every=1000)) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM after step 2" in err and "holds step 2 of 5" in err
    assert torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["step"] == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


# ----------------------------------------------------------------------------- bad flags


def numeric_flags():
    """(module, required argv, flag) for every int/float flag of every script, read from its own parser."""
    import argparse
    import importlib
    scripts = {"stage1_rcae": ["--data", "x"], "stage2_dpn": ["--data", "x"], "stage3_crd": ["--data", "x"],
               "baselines.fair": ["--data", "x"], "evaluate": ["--data", "x"],
               "benchmarks.compare": ["--data", "x"], "benchmarks.ablations": ["--table", "2", "--data", "x"],
               "benchmarks.speed": []}
    cases = []
    for name, argv in scripts.items():
        mod, parsers = importlib.import_module(name), []
        real = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = lambda self, *a, **k: (parsers.append(self), real(self, *a, **k))[1]
        try:
            with pytest.raises(SystemExit), open(os.devnull, "w") as null, __import__("contextlib").redirect_stdout(null):
                mod.get_args(argv + ["--help"])
        finally:
            argparse.ArgumentParser.parse_args = real
        cases += [(name, argv, a.option_strings[0]) for a in parsers[0]._actions
                  if a.type in (int, float) and a.help != argparse.SUPPRESS]
    return cases


@pytest.mark.parametrize("name,argv,flag", numeric_flags())
def test_every_numeric_flag_is_range_checked_in_one_line(name, argv, flag, capsys):
    """-1 is out of range for every numeric flag (none may be negative): one line, exit 2, before any work."""
    import importlib
    mod = importlib.import_module(name)
    assert run(argv + [flag, "-1"], main=mod.get_args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be") and err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "inf"], ["--anomaly_prob", "1.5"],
                                   ["--holdout", "1"], ["--amp", "2"], ["--image_size", "0"]])
def test_stage1_flags_out_of_range(flags, capsys):
    assert run(["--data", "x"] + flags, main=stage1_rcae.get_args) == 2
    assert capsys.readouterr().err.startswith(f"error: {flags[0]} must be")


def test_recursion_depth_must_be_in_1_to_n():
    model = stage1_rcae.RcAE(stage1_rcae.Config(width=4, depth=2))
    x = torch.rand(1, 3, 16, 16)
    for n in (0, 3, -1):
        with pytest.raises(ValueError, match=f"n={n} is not in 1..N=2"):
            model(x, n)
    assert model(x).shape == model(x, 2).shape == x.shape


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.mark.parametrize("content", ["empty", "random", "truncated", "version 1"])
def test_broken_checkpoint_is_one_line_naming_overwrite(toy_data, tmp_path, content, capsys):
    """Also a checkpoint of format version 1 (before the flags were renamed): refused, no compatibility code."""
    path = tmp_path / "stage1_rcae.pt"
    if content in ("truncated", "version 1"):
        stage1_rcae.main(quick_args(toy_data, tmp_path, max_steps=1))
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "version 1":
        torch.save({**torch.load(path, weights_only=True), "version": 1}, path)
    else:
        path.write_bytes(b"" if content == "empty" else os.urandom(4096))
    for main, kw in ((stage1_rcae.main, {}), (stage2_dpn.main, UPSTREAM)):  # its own stage, the next one reading it
        assert run(quick_args(toy_data, tmp_path, max_steps=1, **kw), main=main) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}") and err.count("\n") == 1, err
        assert "--overwrite" in err and "weights_only" not in err and "Traceback" not in err
    assert {"empty": "is empty", "version 1": "has checkpoint format version 1, this code reads 2"}.get(
        content, "not a checkpoint this code wrote") in err


def test_one_image_category_does_not_blame_a_holdout_flag_never_passed(tmp_path, capsys):
    data = synth.make_synthetic_category(tmp_path / "one", size=32, n_train=1, n_test_good=1, n_test_bad=1)
    stage1_rcae.main(quick_args(data, tmp_path / "run", image_size=32, depth=2, max_steps=1))
    for main in (stage2_dpn.main, stage3_crd.main):
        main(quick_args(data, tmp_path / "run", max_steps=1, **UPSTREAM))
    err = capsys.readouterr().err
    assert "--holdout 0 " not in err and "no holdout images (train/good too small to keep a --holdout 0.1 of it)" in err


# ----------------------------------------------------------------------------- --help


def help_of(main_module, capsys):
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(main_module).get_args(["--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


@pytest.mark.parametrize("name", ["stage1_rcae", "stage2_dpn", "stage3_crd", "baselines.fair", "evaluate"])
def test_help_prints_each_default_once(name, capsys):
    import re
    text = help_of(name, capsys)
    assert not re.search(r"\(default:[^)]*\)(?:(?! --).)*\(default:", text), text
    if name.startswith("stage"):
        epochs = {"stage1_rcae": 1500, "stage2_dpn": 400, "stage3_crd": 300}[name]
        assert f"passes over the training images (default: {epochs}, as in the paper)" in text
    if name in ("stage2_dpn", "stage3_crd"):  # no flag for what the stage-1 checkpoint sets
        for flag in common.INHERITED:
            assert f"--{flag}" not in text, flag
        assert "(default: 1024" not in text
    if name == "baselines.fair":
        assert "square input size (default: 256, as in the FAIR paper)" in text and "1024" not in text


def test_ablations_table_out_of_range_is_one_line(capsys):
    from benchmarks import ablations
    with pytest.raises(common.UserError, match="--table must be 2, 4, 5 or 6"):
        ablations.get_args(["--table", "3", "--data", "x"])
