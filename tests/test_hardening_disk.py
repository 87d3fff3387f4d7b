"""Bad input, round 2 (issue 43): a full or damaged disk under the Chroma store: ingestion stops before
Chroma fails, the store still reads, the CLI says so in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashback_integrations.cli import app

runner = CliRunner()


def said(result) -> str:
    """The CLI's output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"traceback instead of a message: {result.exception!r}"
    )
    return result


# ----------------------------------------------------------------------------- medium: a full disk in `index add`
@pytest.fixture(scope="module")
def store_corpus(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50} alpha beta" for j in range(120)))
    return corpus


def _ingest(client, corpus, **kw):
    from tiny import make_tokenizer

    from flashback_integrations.store import Embedder, ingest

    return ingest(client, "docs", [corpus], make_tokenizer(add_bos=False), "tiny", Embedder(), chunk_tokens=16,
                  batch_size=4, progress=False, **kw)  # fmt: skip


def test_a_nearly_full_disk_stops_ingestion_before_chroma_fails_and_the_store_still_reads(
    store_corpus, tmp_path, monkeypatch
) -> None:
    """Chroma needs room to apply its log even to answer a read: ingestion stops while there is still room,
    with one line, and the store reads and resumes once there is space again."""
    import shutil as real_shutil

    from flashback_integrations.errors import DiskFullError
    from flashback_integrations.store import chroma, collection_stats, connect

    usage = real_shutil.disk_usage
    checks = {"n": 0}

    def nearly_full(path):
        checks["n"] += 1
        free = usage(path).free if checks["n"] <= 3 else chroma.DISK_RESERVE_BYTES // 2
        return usage(path)._replace(free=free)

    monkeypatch.setattr(chroma.shutil, "disk_usage", nearly_full)
    store = tmp_path / "store"
    with pytest.raises(DiskFullError, match="nearly full.*resumes where it stopped"):
        _ingest(connect(store), store_corpus)
    assert collection_stats(connect(store), "docs")["chunks"] == 12  # three batches of 4 written, then stopped
    monkeypatch.setattr(chroma.shutil, "disk_usage", usage)
    report = _ingest(connect(store), store_corpus)
    reference = _ingest(connect(tmp_path / "reference"), store_corpus)
    assert report.chunks_total == reference.chunks_total and report.chunks_added == reference.chunks_total - 12


def test_a_write_that_fails_for_space_is_one_line_in_the_cli(store_corpus, tmp_path, monkeypatch) -> None:
    """When the disk fills anyway (another process), Chroma's internal error becomes one line naming the disk."""
    import errno

    from chromadb.api.models.Collection import Collection

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Collection, "upsert", no_space)
    result = cli("index", "add", str(store_corpus), "--collection", "docs", "--persist-dir", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert "no space left on the disk" in said(result) and "Traceback" not in said(result)


def test_a_damaged_chroma_store_is_a_message_in_index_query(store_corpus, tmp_path, monkeypatch) -> None:
    from chromadb.api.models.Collection import Collection
    from chromadb.errors import InternalError

    from flashback_integrations.store import connect

    store = tmp_path / "store"
    _ingest(connect(store), store_corpus)

    def damaged(self, *args, **kwargs):
        raise InternalError("Error executing plan: segment reader failed")

    monkeypatch.setattr(Collection, "query", damaged)
    monkeypatch.setattr(Collection, "get", damaged)
    for args in (("index", "query", "docs", "alpha"), ("index", "stats", "docs")):
        result = cli(*args, "--persist-dir", str(store))
        assert result.exit_code == 2 and "store is damaged" in said(result), result.output


def test_a_real_full_filesystem_when_one_can_be_mounted(store_corpus, tmp_path) -> None:
    """The same on a real 3 MiB tmpfs (needs root and mount; elsewhere the simulated tests above stand)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        from flashback_integrations.errors import DiskFullError
        from flashback_integrations.store import collection_stats, connect

        with pytest.raises(DiskFullError, match="nearly full"):
            _ingest(connect(small / "store"), store_corpus)
        # 3 MiB is below the reserve: stopped before the first write, and the store still answers a read
        assert collection_stats(connect(small / "store"), "docs")["chunks"] == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)  # lazy: Chroma may still hold its files
