"""Both callbacks under FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` in ``configure_model``).

One subprocess run of ``fsdp_runs.py`` (2 CPU processes, gloo; the strategy re-launches
its script), checked by the tests below.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_soft_training import fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    paths = [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    done = subprocess.run(
        [sys.executable, str(HERE / "fsdp_runs.py"), str(out)], env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _reports(out: Path) -> dict[int, dict[str, Any]]:
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def test_soft_training_under_fsdp2_matches_one_process(runs: Path, tmp_path: Path) -> None:
    soft = torch.load(runs / "soft.pt")
    _, single, single_taus = fit(str(tmp_path), devices=1)
    assert soft["whole_taus"] == single_taus  # the schedule advanced identically on every rank
    for name, value in single.items():
        torch.testing.assert_close(soft["whole"][name], value, atol=1e-6, rtol=1e-5, msg=name)
    _, plain, _ = fit(str(tmp_path / "plain"), devices=1, soft=False)  # and soft is not what plain training gives
    assert max((soft["whole"][k] - v).abs().max().item() for k, v in plain.items()) > 1e-4


def test_soft_training_resumes_from_a_sharded_checkpoint(runs: Path) -> None:
    checkpoint = runs / "soft" / "resume-epoch=0.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in checkpoint.iterdir()}  # one shard a rank
    meta = torch.load(checkpoint / "meta.pt", weights_only=False)
    (state,) = [value for key, value in meta["callbacks"].items() if "SoftBackwardTraining" in key]
    assert state["resolved"] is not None  # the schedule's stop points travel in the checkpoint
    soft = torch.load(runs / "soft.pt")
    assert soft["resumed_taus"] == soft["whole_taus"][2:]  # the resumed fit ran step 2 only, on the same schedule
    for name, value in soft["whole"].items():
        torch.testing.assert_close(soft["resumed"][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_training_is_bit_identical_with_the_explanation_callback_which_explains_right(runs: Path) -> None:
    states = torch.load(runs / "states.pt")
    plain, watched = states["plain"], states["watched"]
    assert plain.keys() == watched.keys() and len(plain) > 0
    for name, value in plain.items():
        assert torch.equal(value, watched[name]), name
    # and the sharded explanation is the one an unsharded copy of the final weights gives
    torch.testing.assert_close(states["last_log"], states["unsharded"], atol=1e-5, rtol=1e-4)


def test_every_rank_explains_an_equal_padded_shard_and_leaves_fsdp_as_it_was(runs: Path) -> None:
    reports = _reports(runs)
    steps = [log["step"] for log in reports[0]["logs"]]
    assert steps == [log["step"] for log in reports[1]["logs"]] == [0, 1, 2, 3]  # fit start, then every step
    for rank, shard in ((0, [0, 2]), (1, [1, 1])):  # 3 images: rank 1 repeats its image to keep in step
        for log in reports[rank]["logs"]:
            assert log["indices"] == shard
            assert log["forward_dtypes"] == ["torch.float32"]  # explained in float32 under bf16-mixed
            assert log["sharded"] and log["grads_kept"]  # resharded, and no gradient reduce-scattered into .grad
    assert any(log["had_grads"] for log in reports[0]["logs"])  # the gradient check had gradients to compare

    event_files = glob.glob(str(runs / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(event_files) == 1  # rank 0 alone writes
    events = EventAccumulator(event_files[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = [f"semantic_pullback/probe_{i:02d}" for i in range(3)] + ["semantic_pullback/overview"]
    assert sorted(events.Tags()["images"]) == sorted(tags)  # the padding is dropped: 3 images, not 4
    for tag in tags:
        assert [e.step for e in events.Images(tag)] == steps


def test_the_fsdp_recipe_runs_both_callbacks(runs: Path) -> None:
    run_dir = runs / "recipe" / "lightning_logs" / "version_0"
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in checkpoint.iterdir()}  # sharded
    callbacks = torch.load(checkpoint / "meta.pt", weights_only=False)["callbacks"]
    for name in ("SoftBackwardTraining", "SemanticPullbackCallback"):  # both callbacks' states travel in it
        assert any(name in key for key in callbacks), name
    (event_file,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    events = EventAccumulator(event_file, size_guidance={"images": 0})
    events.Reload()
    assert {f"semantic_pullback/probe_{i:02d}" for i in range(8)} <= set(events.Tags()["images"])
