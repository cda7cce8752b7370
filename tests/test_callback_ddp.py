"""The callback under DDP: 2 processes, gloo, CPU, in a subprocess (DDP re-launches its script)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_ddp_shards_the_probe_set_and_rank_zero_writes(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "callback_ddp_script.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,  # a hang fails here
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reports = {}
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as handle:
            reports[rank] = json.load(handle)

    # 5 probe images, 2 steps per epoch and rank: logs at steps 0, 2 (rank 1 fails there) and 4.
    assert reports[0]["explained"] == [[0, [0, 2, 4]], [2, [0, 2, 4]], [4, [0, 2, 4]]]
    assert reports[1]["explained"] == [[0, [1, 3, 3]], [4, [1, 3, 3]]]  # padded to an equal share (FSDP needs it)
    assert reports[0]["probe_checksum"] == reports[1]["probe_checksum"]  # the same probe set on both ranks
    for report in reports.values():  # the explanations never went through the DDP wrapper
        assert report["wrapper"] == "DistributedDataParallel" and report["wrapper_calls"] == 0
    (failure,) = reports[0]["failures"]  # reported once, by rank 0; training went on
    assert "failed at step 2: RuntimeError: rank 1 fails here" in failure
    assert reports[1]["failures"] == []

    event_files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(event_files) == 1  # one writer
    events = EventAccumulator(event_files[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = [f"semantic_pullback/probe_{i:02d}" for i in range(5)] + ["semantic_pullback/overview"]
    assert sorted(events.Tags()["images"]) == sorted(tags)
    for tag in tags:  # each image once per successful log, none duplicated
        assert [e.step for e in events.Images(tag)] == [0, 4]
    # metrics: each rank scores its share, rank 0 logs the mean over the whole probe set
    logged = events.Scalars("semantic_pullback/metrics/faithfulness_correlation")
    assert [e.step for e in logged] == [0, 4] and all(math.isfinite(e.value) for e in logged)
    assert math.isclose(logged[-1].value, reports[0]["faithfulness_correlation"], rel_tol=1e-4, abs_tol=1e-6)
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)
