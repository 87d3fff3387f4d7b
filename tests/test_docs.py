"""The docs site builds strictly (every link, anchor and API reference resolves) and the README stays a short
user guide that points into it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_with_warnings_as_errors(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("FlashBackModel", "FlashBackConfig", "ChatFlashBack", "FlashBackQueryEngine", "question_passages"):
        assert name in api, name


def test_the_readme_is_a_short_guide_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.count("\n") <= 350
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if not link.startswith("http")]
    missing = [link for link in local if not (ROOT / link).exists()]
    assert local and not missing, missing
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, flags=re.M)), "every page is in the nav, once"
