"""`flashback serve` as a user runs it: one command over a model folder and an embedded Chroma collection,
answering the openai SDK with retrievals that name their sources, and draining in-flight streams on
SIGTERM before it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from tiny import make_tokenizer, save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations.cli import app
from flashback_integrations.store import Embedder, connect, ingest

DOCS = {
    "warranty.txt": "The warranty of the K3 kettle lasts two years from the date of purchase.",
    "errors.txt": "Error code E4 on the K3 kettle means the water tank is empty; refill it.",
    "cleaning.txt": "Descale the K3 kettle every month with citric acid and rinse it twice.",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    model = save_tiny_chat_model(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    ingest(connect(root / "db"), "kettle", [corpus], make_tokenizer(), "tiny", Embedder(), chunk_tokens=32,
           progress=False)  # fmt: skip
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "flashback"), "serve", "--model", model, "--collection", "kettle",
        "--persist-dir", str(root / "db"), "--port", str(port), "--mode", "append", "--stride", "4",
        "--max-tokens", "16",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"flashback serve did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_one_command_serves_the_collection_with_sources(served) -> None:
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What does error code E4 mean?"}],
    )
    retrievals = reply.model_extra["flashback"]["retrievals"]
    assert len(retrievals) == 4 and reply.usage.completion_tokens == 16  # --max-tokens, --stride
    sources = {Path(p["source"]).name for r in retrievals for p in r["passages"]}
    assert sources <= set(DOCS) and sources
    with pytest.raises(openai.NotFoundError, match="collection"):
        client.chat.completions.create(
            model=reply.model,
            messages=[{"role": "user", "content": "a"}],
            extra_body={"flashback": {"collection": "x"}},
        )


def test_sigterm_drains_the_stream_in_flight_then_exits(served) -> None:
    url, proc = served
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {
        "model": model, "messages": [{"role": "user", "content": "How do I descale it?"}], "max_tokens": 200,
        "stream": True, "flashback": {"stride": 1},  # a retrieval per token: a few seconds of work
    }  # fmt: skip
    lines = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line and not lines:
                proc.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    usage = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
    assert usage["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal once drained, so the exit status says what stopped it, as for any daemon
    assert proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_binding_beyond_loopback_needs_an_api_key() -> None:
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env={"FLASHBACK_API_KEY": ""})
    assert result.exit_code == 2
    assert "--api-key" in result.output
