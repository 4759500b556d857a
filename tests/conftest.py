"""Shared fixtures: small synthetic categories made by the project's own generator (64 px, seconds)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)

import synth  # noqa: E402


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """An MVTec-layout category: 24 train/good, 6 test/good, 6 test/defect with masks, 64x64 RGB."""
    return synth.make_synthetic_category(tmp_path_factory.mktemp("mvtec") / "toy", size=64, n_train=24,
                                         n_test_good=6, n_test_bad=6, seed=0)


@pytest.fixture(scope="session")
def toy_visa(tmp_path_factory):
    """A VisA-layout object 'toy' (Data/Images, Data/Masks, ../split_csv/1cls.csv), 64x64."""
    return synth.make_synthetic_category(tmp_path_factory.mktemp("visa"), size=64, n_train=12,
                                         n_test_good=4, n_test_bad=4, seed=1, layout="visa")


def quick_args(data, out, **kw):
    """argv for a few-step CPU run of any stage on 64 px images."""
    a = dict(data=data, out=out, image_size=64, max_steps=2, batch_size=4, depth=3)
    a.update(kw)
    argv = []
    for k, v in a.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv
