"""What a user sees when things go wrong: interrupts, time-based checkpoints, bad flags, bad checkpoints."""
import os
import signal

import pytest
import torch
from conftest import quick_args

import common
import stage1_rcae


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


def test_checkpoint_every_few_minutes_of_wall_time(toy_data, tmp_path, monkeypatch):
    steps = saves_of(monkeypatch)
    stage1_rcae.main(quick_args(toy_data, tmp_path / "a", max_steps=4, save_every=1000, save_every_min=1e-9))
    assert steps == [1, 2, 3, 4]  # every step is "minutes" after the last save; the last one is the final save
    steps.clear()
    stage1_rcae.main(quick_args(toy_data, tmp_path / "b", max_steps=4, save_every=1000, save_every_min=0))
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
    assert run(quick_args(toy_data, tmp_path / "cut", max_steps=5, save_every=1000, save_every_min=0)) == 130
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
    assert "no checkpoint yet" in capsys.readouterr().err
    assert not (tmp_path / "stage1_rcae.pt").exists()


def test_sigterm_finishes_the_step_saves_it_and_exits_143(toy_data, tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, 2, "signal")  # SIGTERM arrives during step 2, which still finishes
    assert run(quick_args(toy_data, tmp_path, max_steps=5, save_every=1000, save_every_min=0)) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM after step 2" in err and "holds step 2 of 5" in err
    assert torch.load(tmp_path / "stage1_rcae.pt", weights_only=True)["step"] == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
