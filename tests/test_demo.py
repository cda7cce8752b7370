"""The shapes demo and its localisation summary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sp_lightning import demo


def test_localisation_counts_absolute_relevance_over_channels() -> None:
    """The demo scores |attribution| summed over channels with the library's mask metrics."""
    from torch import nn
    from torch.utils.data import DataLoader

    class Fixed(nn.Module):
        """A stand-in explainer target: its attributions are given, not computed."""

    attributions = torch.zeros(2, 3, 4, 4)
    attributions[0, 0, 0, 1] = -3.0  # strongest |relevance| on the object (sign ignored)
    attributions[0, 1, 3, 3] = 1.0
    attributions[1, 2, 3, 0] = 2.0  # strongest relevance off the object
    attributions[1, 0, 1, 1] = 1.0
    attributions[1, 1, 1, 1] = -0.5  # |relevance| adds up over channels: 1.5 on the object
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True  # the object is the top-left quarter

    class Given:
        model = Fixed()

        def attribute(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return attributions

    loader = DataLoader([(torch.rand(3, 4, 4), 0, masks[i]) for i in range(2)], batch_size=2)
    scores = demo.localisation(loader, {"given": Given()})["given"]  # type: ignore[dict-item]
    assert scores.pointing == pytest.approx(0.5)
    assert scores.mass == pytest.approx((3.0 / 4.0 + 1.5 / 3.5) / 2)


def test_demo_runs_and_reports_accuracy_and_localisation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    result = demo.main(["--tiny", "--logdir", str(tmp_path), "--threads", "1"])
    assert torch.get_num_threads() == threads  # the demo's thread setting is undone
    out = capsys.readouterr().out
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["localisation"]) == {"gradient", "soft pullback"}
    for score in result["localisation"].values():
        assert 0.0 <= score.pointing <= 1.0 and 0.0 < score.mass < 1.0
    assert f"Validation accuracy: {result['accuracy']:.1%}" in out
    assert f"Explore the run:  sp-lightning tensorboard {tmp_path}" in out  # keeps every step
    assert any(Path(result["logdir"]).glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result["logdir"]), size_guidance={"images": 0}).Reload()
    assert "semantic_pullback/overview" in events.Tags()["images"]  # the callback logged explanations
