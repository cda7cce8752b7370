"""``sp-lightning evaluate``: the paper's table for a model the project trains itself, at a tiny budget."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import math
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sp_lightning.cli import main
from sp_lightning.evaluation import rows
from sp_lightning.evaluation.run import load_weights
from sp_lightning.models import ImageClassifier

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
ROWS = ["Gradient", "SoftPullback", "PullbackAscent", "SmoothGrad", "IntegratedGradients", "GuidedGradCam"]
COLUMNS = ["Infidelity", "FaithfulnessCorrelation", "FaithfulnessEstimate", "MonotonicityCorrelation",
           "MaxSensitivity", "RandomLogit", "PointingGame", "RelevanceMass", "Focus"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(*words: str) -> None:
    """``sp-lightning WORDS`` in this process; a clean exit is fine."""
    try:
        main(list(words))
    except SystemExit as exit_:
        assert exit_.code in (0, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """A checkpoint of configs/tiny.yaml trained two epochs by `sp-lightning fit`, and its run's saved config."""
    root = tmp_path_factory.mktemp("fit")
    run("fit", "--config", CONFIG, f"--trainer.default_root_dir={root}")
    (ckpt,) = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    (config,) = glob.glob(str(root / "**" / "config.yaml"), recursive=True)
    return ckpt, config


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


EVALUATE = ["--num_images", "4", "--batch_size", "2", "--fast"]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> tuple[str, str]:
    """`sp-lightning evaluate` of that checkpoint at a tiny budget: its output directory and what it printed."""
    ckpt, config = trained
    out = str(tmp_path_factory.mktemp("eval"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run("evaluate", "--config", config, "--ckpt_path", ckpt, "--out", out, *EVALUATE)
    return out, printed.getvalue()


def test_evaluate_writes_the_papers_table_for_a_trained_checkpoint(evaluated) -> None:
    out, printed = evaluated
    lines = read_csv(os.path.join(out, "evaluation.csv"))
    assert [(line["explainer"], line["metric"]) for line in lines] == [(r, c) for r in ROWS for c in COLUMNS]
    for line in lines:
        assert int(line["total"]) == (2 if line["metric"] == "Focus" else 4)  # 4 images, 4 // 2 mosaics
        assert int(line["count"]) == 0 or math.isfinite(float(line["mean"]))
    assert all(int(line["count"]) > 0 for line in lines if line["metric"] != "FaithfulnessEstimate")
    with open(os.path.join(out, "evaluation.md"), encoding="utf-8") as handle:
        table = handle.read()
    header, rule, *body = table.splitlines()[: 2 + len(ROWS)]
    assert header.split(" | ")[1:4] == ["Infidelity ↓", "FaithfulnessCorrelation ↑", "FaithfulnessEstimate ↑"]
    assert [line.split(" | ")[0] for line in body] == [f"| {r}" for r in ROWS] and " ± " in body[0]
    assert "fast (the callback's cheap settings)" in table and "2 2x2 mosaics" in table
    assert table in printed
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    for line in lines:
        (scalar,) = events.Scalars(f"evaluation/{line['metric']}/{line['explainer']}")
        assert scalar.value == pytest.approx(float(line["mean"]), nan_ok=True, rel=1e-6)


def test_a_checkpoint_of_another_model_is_refused_with_the_fix(trained) -> None:
    other = ImageClassifier(5, backbone_kwargs={"widths": [8, 16, 32]})
    with pytest.raises(ValueError, match="another model than the config builds.*Pass the config the checkpoint"):
        load_weights(other, trained[0])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(other, trained[0] + ".missing")


def test_without_captum_the_captum_rows_are_left_out_with_a_note(monkeypatch) -> None:
    monkeypatch.setattr(rows, "captum_installed", lambda: False)
    found, notes = rows.default_explainers(ImageClassifier(3), (3, 8, 8), 2.0)
    assert list(found) == ROWS[:4] and "Captum is not installed" in notes[0]


def test_two_processes_sync_through_the_metrics(trained, evaluated, tmp_path) -> None:
    """devices=2: each process scores half of the images; the table holds all of them, as one process gets them."""
    ckpt, config = trained
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "sp_lightning.cli", "evaluate", "--config", config, "--ckpt_path", ckpt,
               "--out", str(out), *EVALUATE, "--explainers", "Gradient", "--trainer.devices=2", "--trainer.strategy=ddp"]
    subprocess.run(command, check=True, timeout=300, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    two = {line["metric"]: line for line in read_csv(str(out / "evaluation.csv"))}
    one = {line["metric"]: line for line in read_csv(os.path.join(evaluated[0], "evaluation.csv"))
           if line["explainer"] == "Gradient"}
    assert "2 process(es)" in (out / "evaluation.md").read_text(encoding="utf-8")
    assert all(line["total"] == one[metric]["total"] for metric, line in two.items())
    for metric in ("FaithfulnessCorrelation", "FaithfulnessEstimate", "PointingGame", "RelevanceMass", "Focus"):
        # these metrics draw no random numbers: the same scores however the images are split
        assert two[metric]["count"] == one[metric]["count"]
        assert float(two[metric]["mean"]) == pytest.approx(float(one[metric]["mean"]), rel=1e-5, nan_ok=True)
