"""The README's code snippets run as written (the README must stay accurate)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_snippet_runs(index: int) -> None:
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md[python block {index}]", "exec"), namespace)
    assert len(namespace) > 1  # the snippet defined something
