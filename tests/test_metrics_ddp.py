"""Metric states are synced across DDP ranks by torchmetrics, also inside Lightning validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _metrics_support import batch, tiny_cnn

from sp_lightning.metrics import FaithfulnessCorrelation

SCRIPT = Path(__file__).with_name("ddp_metrics_script.py")


def test_two_rank_validation_syncs_means_and_per_sample_scores(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), str(SCRIPT.parent), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank sees the same synced result
    result = ranks[0]

    # One process over all 8 samples: the DistributedSampler gave rank 0 samples 0, 2, 4, 6 and rank 1 the rest.
    x, y, a = batch(size=8)
    single = FaithfulnessCorrelation(tiny_cnn())
    single.update(x, a, y)
    expected = single.per_sample_scores()
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    torch.testing.assert_close(torch.tensor(result["faithfulness"]["per_sample"]), expected[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["faithfulness"]["mean"]), expected.mean(), rtol=1e-5, atol=1e-6)
    logit = torch.tensor(result["random_logit"]["per_sample"])
    assert logit.shape == (8,)
    torch.testing.assert_close(torch.tensor(result["random_logit"]["mean"]), logit.mean(), rtol=1e-5, atol=1e-6)
