"""The fixed CI sample of benchmarks/coverage_sweep.py: every model softens or reports every gated op."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage_sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("coverage_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules["coverage_sweep"] = module
    spec.loader.exec_module(module)
    return module


def test_coverage_sweep_sample() -> None:
    """Forward bit-identical, oracle matched (no silent gated op), SP finite, state restored, clean.

    The transformers rows run only when transformers (an optional extra) is installed.
    """
    sweep = load_sweep()
    rows = sweep.sweep(list(sweep.SOURCES), sweep.SAMPLE, echo=False)
    built = {f"{r.source}:{r.name.split(': ')[-1]}" for r in rows if r.status != "not run"}
    expected = {entry for entry in sweep.SAMPLE if not entry.startswith("transformers:")}
    assert expected <= built, sweep.markdown(rows)
    assert all(r.status == "clean" for r in rows), sweep.markdown(rows)
    assert sweep.summary(rows).endswith(f"{len(rows)}/{len(rows)} clean; 0 with silent gated ops")
