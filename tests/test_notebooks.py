"""The course notebooks run end to end on a tiny synthetic category (RCAE_NOTEBOOK_QUICK=1), headless.

Both notebooks share one temporary RCAE_WORKDIR, so the second finds the synthetic run the first trained
(the stages resume a finished checkpoint as "nothing to do") and only evaluates it. The kernel is the
"python3" kernelspec that ipykernel ships with itself: `pip install -r requirements.txt` is all it needs.
"""
import json
import math
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_recursion_dynamics.ipynb", "02_per_category_results.ipynb"]
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")  # --max_steps, not the "--" of a markdown table


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def execute(name, workdir, monkeypatch):
    """Run a notebook in a fresh kernel started in notebooks/ (as Jupyter would); returns the executed notebook."""
    monkeypatch.setenv("RCAE_NOTEBOOK_QUICK", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("RCAE_WORKDIR", str(workdir))
    monkeypatch.delenv("RCAE_RUN", raising=False)
    monkeypatch.delenv("RCAE_METRICS_GLOB", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def text_of(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "```bash\npython " in first.source, \
        "the first cell says which command produced what the notebook reads"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"


def test_notebooks_name_only_flags_and_recipes_the_code_has(capsys):
    """Every --flag the notebooks mention (commands in the markdown, calls in the code) is a flag of a stage,
    evaluate.py or FAIR, and every --recipe is one of common.RECIPES: a renamed or removed one fails here."""
    import common
    import evaluate
    import stage1_rcae
    import stage2_dpn
    import stage3_crd
    from baselines import fair
    known = set()
    for cli in (stage1_rcae, stage2_dpn, stage3_crd, evaluate, fair):
        with pytest.raises(SystemExit):
            cli.get_args(["--help"])
        known |= set(FLAG.findall(capsys.readouterr().out))
    for name in NAMES:
        text = "".join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells)
        named = set(FLAG.findall(text))
        assert {"data", "recipe"} <= named <= known, f"{name}: flags no command has: {sorted(named - known)}"
        recipes = re.findall(r"--recipe\W+(\w+)", text)
        assert recipes and set(recipes) <= set(common.RECIPES), f"{name}: recipes {recipes}, not {list(common.RECIPES)}"


def test_recursion_dynamics_runs(workdir, monkeypatch):
    nb = execute(NAMES[0], workdir, monkeypatch)
    assert "training a small synthetic one" in text_of(nb)
    for fig in ("reconstructions", "residuals", "dpn", "crd_map", "residual_vs_depth"):
        png = workdir / "figures" / f"01_{fig}.png"
        assert png.is_file() and png.stat().st_size > 1000, png
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # a value the notebook computed: the normal image's residual per depth, recomputed here from the same run
    import torch

    import common
    import evaluate
    import stage3_crd
    printed = re.search(r"\|I - I_R\^n\|: \[([^\]]*)\]", text_of(nb)).group(1)
    run = workdir / "runs" / "toy_quick"
    ck = common.load_checkpoint(run / "stage1_rcae.pt", "stage1_rcae")
    test = evaluate.load_test(ck["args"]["data"], ck["model_config"]["image_size"], ck["args"]["resize"])
    x = common.to_float(test.images[[int(torch.nonzero(test.labels == 0)[0])]])  # the notebook's normal image
    with torch.inference_mode():
        recons = stage3_crd.load_detector(str(run))(x)["recons"]  # (1, N, 3, H, W)
    ours = (recons - x[:, None]).abs().mean((0, 2, 3, 4))  # (N,)
    assert [float(v) for v in printed.split()] == pytest.approx(ours.tolist(), abs=1.5e-4)


def test_per_category_results_runs(workdir, monkeypatch):
    nb = execute(NAMES[1], workdir, monkeypatch)
    out = text_of(nb)
    assert "no paper value" in out  # the synthetic category is in neither MVTec AD nor VisA
    metrics = json.loads((workdir / "runs" / "toy_quick" / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"rcae", "rcae+dpn", "crd"}
    for fig in ("ablation", "paper_vs_ours", "accuracy_speed_size"):
        png = workdir / "figures" / f"02_{fig}.png"
        assert png.is_file() and png.stat().st_size > 1000, png


def test_paper_results_match_their_averages():
    """Each dataset's per-category values of Table 1 average to the paper's printed average (to its rounding)."""
    paper = json.loads((NOTEBOOKS / "paper_results.json").read_text())
    t1 = paper["table1"]
    assert len(t1["mvtec"]) == 15 and len(t1["visa"]) == 12
    for dataset in ("mvtec", "visa"):
        for metric in ("i_auroc", "p_auroc"):
            mean = sum(v[metric] for v in t1[dataset].values()) / len(t1[dataset])
            assert math.isclose(mean, t1["average"][dataset][metric], abs_tol=0.05), (dataset, metric, mean)
    assert [r["variant"] for r in paper["table2"]["rows"]] == [None, "rcae", "rcae+dpn", "crd"]
    assert paper["table2"]["rows"][-1]["i_auroc"] == t1["average"]["mvtec"]["i_auroc"]  # the full method = Table 1
    assert "AAAI 2026" in paper["source"]["venue"]
