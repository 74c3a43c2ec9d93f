"""The Python examples of the README and of docs/ run as written (```python blocks; ```py blocks are
fragments that need a trained checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
]


@pytest.mark.parametrize(
    ("page", "code"), BLOCKS, ids=[f"{page.stem}-{i}" for i, (page, _) in enumerate(BLOCKS)]
)
def test_python_block_runs(page: Path, code: str) -> None:
    exec(compile(code, str(page), "exec"), {"__name__": "__readme__"})


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"/(work|home|root|tmp)/", text)  # no paths of the machine a run was made on
