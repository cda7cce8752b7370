"""Suite-wide fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _run_in_a_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs every test in its own empty working directory: files a test or Lightning writes to
    relative paths (``lightning_logs/``, PNG panels) never land in the repository."""
    monkeypatch.chdir(tmp_path)
