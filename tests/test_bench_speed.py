"""`flashback bench speed` end to end on a tiny model (the numbers themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations.bench.forward import _cost_at, predict_runs
from flashback_integrations.bench.models import plan_lengths
from flashback_integrations.cli import app


def test_speed_benchmark_writes_json_and_plot(tmp_path) -> None:
    model = save_tiny_chat_model(tmp_path / "tiny", marks=False)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "speed",
            "--model",
            model,
            "--lengths",
            "64,96",
            "--stride",
            "4",
            "--doc-tokens",
            "8",
            "--repeats",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--stem",
            "t",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "t.json").read_text())
    assert len(data["runs"]) == 10 and set(data["speedups"]) == {"64", "96"}
    by = {(r["mode"], r["total_tokens"]): r for r in data["runs"]}
    for total in (64, 96):
        # the cost model: prepend recomputes the context, append only the tail, none nothing
        assert (
            by["prepend", total]["forward_tokens"]
            > by["append", total]["forward_tokens"]
            > by["none", total]["forward_tokens"]
        )
        assert len(by["append", total]["seconds"]) == 2
        # isolated, warm: passages recur, so only s + t ids per retrieval go through the model
        assert by["append", total]["forward_tokens"] > by["isolated-warm", total]["forward_tokens"]
        assert by["isolated-warm", total]["forward_tokens"] > by["none", total]["forward_tokens"]
        assert by["isolated", total]["forward_tokens"] > by["isolated-warm", total]["forward_tokens"]
        assert "isolated_warm_over_none" in data["speedups"][str(total)]
    assert (tmp_path / "out" / "t.png").stat().st_size > 1000


def test_plan_lengths() -> None:
    assert plan_lengths(2048, 128, None, None) == (512, 1408)
    assert plan_lengths(512, 128, None, None) == (128, 256)
    assert plan_lengths(16384, 128, None, 1024) == (15232, 1024)


def test_speed_benchmark_batches_rows_in_lockstep(tmp_path) -> None:
    model = save_tiny_chat_model(tmp_path / "tiny", marks=True)  # marks are the highest ids, never random input
    args = ["bench", "speed", "--model", model, "--lengths", "64", "--modes", "append,none", "--stride", "4",
            "--doc-tokens", "8", "--repeats", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--batch-size", "3", "--stem", "b"])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "out" / "b.json").read_text())["runs"]
    assert {r["batch_size"] for r in runs} == {3}
    assert all(r["tokens_per_s"] > 0 for r in runs) and not (tmp_path / "out" / "b.partial.json").exists()
    bad = CliRunner().invoke(app, [*args, "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output


def test_forward_costs_time_the_three_forwards_of_a_cycle(tmp_path, monkeypatch) -> None:
    """Decode feeds 1 id after T-1 kept, append's re-feed stride + doc after T - stride - doc, prepend all T."""
    from flashback_integrations.engine.kv import KVContext
    from flashback_integrations.engine.layout import Span

    fed: list[tuple[int, int, int]] = []  # (rows, kept, fed) of every forward
    isolated: list[tuple[int, int, int]] = []  # the same for the isolated layout's cycles
    original = KVContext.next_logits_rows

    def spy(self, ctxs):
        logits, keep, n = original(self, ctxs)
        (isolated if isinstance(ctxs[0][0], Span) else fed).append((len(ctxs), keep, n))
        return logits, keep, n

    monkeypatch.setattr(KVContext, "next_logits_rows", spy)
    model = save_tiny_chat_model(tmp_path / "tiny", marks=True)
    args = ["bench", "forward", "--model", model, "--lengths", "40,64", "--stride", "4", "--doc-tokens", "8",
            "--repeats", "2", "--batch-size", "2", "--out", str(tmp_path / "out"), "--stem", "f"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "out" / "f.json").read_text())["runs"]
    assert [r["total_tokens"] for r in runs] == [40, 64]
    for r in runs:
        # the JSON holds rounded figures: ratios agree with them to rounding
        x = r["refeed_ms"] / r["decode_ms"]
        assert r["decode_ms"] > 0 and abs(r["refeed_over_decode"] - x) <= 0.02 * x + 0.01
        assert abs(r["predicted_append_over_none"] - (3 + x) / 4) <= 0.01 * x + 0.005
    # per length: one untimed build, then (warm-up +) repeats x (decode, re-feed, recompute)
    assert fed[0] == (2, 0, 39)
    assert fed[1:4] == [(2, 39, 1), (2, 40 - 12, 12), (2, 0, 40)]
    assert set(fed[1:10]) == {(2, 39, 1), (2, 28, 12), (2, 0, 40)} and fed[10] == (2, 0, 63)
    assert set(fed[11:]) == {(2, 63, 1), (2, 52, 12), (2, 0, 64)} and len(fed) == 17
    # isolated, per length and setting (warm, cold): the stride so far, then the timed retrieval, which
    # keeps the previous head (T - doc - stride - 1 at first) and feeds stride + 1 ids in one forward
    assert len(isolated) == 2 * 2 * (3 + 2) and isolated[1] == (2, 40 - 8 - 4 - 1, 5)
    assert all(n == 5 for _, _, n in isolated[1::2])
    for r in runs:
        assert r["isolated_warm_ms"] > 0 and r["isolated_cold_ms"] > 0 and r["predicted_isolated_warm_over_none"] > 0
    assert (tmp_path / "out" / "f.png").stat().st_size > 1000
    predicted = json.loads((tmp_path / "out" / "f.json").read_text())["predicted_runs"]
    assert [(p["total_tokens"], p["prompt_tokens"], p["gen_tokens"]) for p in predicted] == [(40, 10, 22), (64, 16, 40)]
    assert all(p["predicted_s"]["none"] > 0 and p["prepend_over_append"] > 0 for p in predicted)
    bad = CliRunner().invoke(app, [*args[:4], "--lengths", "12", "--stride", "4", "--doc-tokens", "8"])
    assert bad.exit_code == 2 and "must exceed stride + doc tokens" in bad.output


def test_predicted_runs_sum_the_forward_costs_over_a_run() -> None:
    """Prefill, then per generated token a decode step, or at every stride-th one the retrieval forward."""
    flat = [
        {"total_tokens": t, "stride": 4, "doc_tokens": 8, "decode_ms": 10.0, "refeed_ms": 40.0, "recompute_ms": 100.0}
        for t in (32, 64)
    ]
    (p,) = predict_runs(flat, [64])  # prompt 16, 40 generated: 9 retrievals after the first, 30 decode steps
    assert (p["prompt_tokens"], p["gen_tokens"]) == (16, 40)
    assert p["predicted_s"] == {"prepend": 1.3, "append": 0.76, "none": 0.49}
    assert p["prepend_over_append"] == round(1300 / 760, 2) and p["append_over_none"] == round(760 / 490, 3)
    (q,) = predict_runs(flat, [64], refeed_ms=10.0)  # a re-feed as cheap as a decode step: append = none + prefill gap
    assert q["predicted_s"]["append"] == 0.49 and q["predicted_s"]["prepend"] == 1.3
    # costs are piecewise linear in T, extended past both measured ends
    linear = [{**r, "decode_ms": r["total_tokens"] / 10} for r in flat]
    assert [_cost_at(linear, "decode_ms", t) for t in (16, 48, 96)] == pytest.approx([1.6, 4.8, 9.6])
    assert _cost_at(linear[:1], "decode_ms", 500) == 3.2  # one measured length: constant


def test_speed_benchmark_in_one_process_loads_the_model_once(tmp_path) -> None:
    """--no-isolate (the GPU default) gives the same work per case as a process per case."""
    model = save_tiny_chat_model(tmp_path / "tiny", marks=False)
    args = ["bench", "speed", "--model", model, "--lengths", "48,64", "--modes", "append,prepend", "--stride", "4",
            "--doc-tokens", "8", "--repeats", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    runs = {}
    for flag in ("--isolate", "--no-isolate"):
        result = CliRunner().invoke(app, [*args, flag, "--stem", flag])
        assert result.exit_code == 0, result.output
        runs[flag] = json.loads((tmp_path / "out" / f"{flag}.json").read_text())
    shared = runs["--no-isolate"]["runs"]
    assert [r["model_reused"] for r in shared] == [False, True, True, True]
    assert not any(r["model_reused"] for r in runs["--isolate"]["runs"])
    assert runs["--no-isolate"]["command"].endswith("--no-isolate")
    assert [r["forward_tokens"] for r in shared] == [r["forward_tokens"] for r in runs["--isolate"]["runs"]]


def test_speed_benchmark_resumes_the_cases_a_stopped_run_finished(tmp_path) -> None:
    model = save_tiny_chat_model(tmp_path / "tiny", marks=False)
    out = tmp_path / "out"
    args = ["bench", "speed", "--model", model, "--lengths", "48", "--modes", "append,none", "--stride", "4",
            "--doc-tokens", "8", "--repeats", "1", "--out", str(out), "--stem", "r"]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "r.json").read_text())["runs"]
    # a stopped run leaves the cases it finished; one was timed with other settings and must not be kept
    stale = {**first[1], "doc_tokens": 16, "median_s": 999.0}
    (out / "r.partial.json").write_text(json.dumps([{**first[0], "median_s": 123.0}, stale]))
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "r.json").read_text())["runs"]
    assert runs[0]["median_s"] == 123.0 and "kept from r.partial.json" in result.output
    assert runs[1]["median_s"] != 999.0 and not (out / "r.partial.json").exists()


def test_forward_costs_with_a_longer_tail_feed_stride_plus_tail(tmp_path, monkeypatch) -> None:
    from flashback_integrations.engine.kv import KVContext
    from flashback_integrations.engine.layout import Span

    isolated: list[int] = []
    original = KVContext.next_logits_rows

    def spy(self, ctxs):
        logits, keep, n = original(self, ctxs)
        if isinstance(ctxs[0][0], Span):
            isolated.append(n)
        return logits, keep, n

    monkeypatch.setattr(KVContext, "next_logits_rows", spy)
    model = save_tiny_chat_model(tmp_path / "tiny", marks=True)
    args = ["bench", "forward", "--model", model, "--lengths", "40", "--stride", "4", "--doc-tokens", "8",
            "--repeats", "1", "--tail-tokens", "3", "--out", str(tmp_path / "out"), "--stem", "t"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all(n == 4 + 3 for n in isolated[1::2])  # each timed retrieval: the stride's ids and the tail
    (run,) = json.loads((tmp_path / "out" / "t.json").read_text())["runs"]
    assert run["tail_tokens"] == 3


def test_summary_compares_backends_side_by_side() -> None:
    from flashback_integrations.bench.speed import build_cases, summarise

    runs = [
        {"total_tokens": 512, "mode": m, "backend": b, "median_s": s}
        for m, b, s in (("append", "torch", 30.0), ("none", "torch", 24.0), ("append", "llamacpp", 15.0),
                        ("none", "llamacpp", 7.5))
    ]  # fmt: skip
    row = summarise(runs)["speedups"]["512"]
    assert row["append_over_none"] == 1.25 and row["llamacpp_append_over_none"] == 2.0
    assert row["append_torch_over_llamacpp"] == 2.0 and row["none_torch_over_llamacpp"] == 3.2
    cases = build_cases("default", "512", "append,none", 16, 128, None, None, 1, 1, "float32", "cpu", "torch,llamacpp")
    assert [(c.backend, c.mode) for c in cases] == [
        ("torch", "append"), ("torch", "none"), ("llamacpp", "append"), ("llamacpp", "none")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="backend"):
        build_cases("default", "512", "append", 16, 128, None, None, 1, 1, "float32", "cpu", "tgi")
    with pytest.raises(ValueError, match="isolated: torch, llamacpp"):
        build_cases("default", "512", "isolated", 16, 128, None, None, 1, 1, "float32", "cpu", "openai")
    isolated = build_cases("shipped", "512", "none,isolated", 16, 128, None, None, 1, 1, "float32", "cpu", "llamacpp")
    assert [(c.backend, c.mode, c.model) for c in isolated] == [
        ("llamacpp", "none", "shipped"), ("llamacpp", "isolated", "shipped")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="shipped"):
        build_cases("shipped", "512", "append", 16, 128, None, None, 1, 1, "float32", "cpu", "torch")


def test_bench_turns_refuses_vllm_before_loading_anything() -> None:
    from flashback_integrations.bench.turns import run_turns

    with pytest.raises(ValueError, match="vLLM keeps the earlier turns"):  # no cold call to compare with
        run_turns("default", "vllm", "none", 2, 8, 4, "float32", 0)


def test_speed_benchmark_times_the_isolated_tail_it_is_given(tmp_path) -> None:
    """The shipped default reads passages with 32 tokens: a retrieval re-feeds stride + tail ids, not stride + 1."""
    model = save_tiny_chat_model(tmp_path / "tiny", marks=False)
    fed = {}
    for tail in (1, 3):
        args = ["bench", "speed", "--model", model, "--lengths", "64", "--modes", "isolated-warm", "--stride", "4",
                "--doc-tokens", "8", "--repeats", "1", "--tail-tokens", str(tail), "--out", str(tmp_path / "out"),
                "--stem", f"t{tail}"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        data = json.loads((tmp_path / "out" / f"t{tail}.json").read_text())
        (run,) = data["runs"]
        assert run["tail_tokens"] == tail and f"--tail-tokens {tail}" in data["command"]
        fed[tail] = run["forward_tokens"]
    # prompt 16, 40 generated, stride 4: 9 retrievals after the first, each re-feeding 2 more history ids
    assert fed[3] - fed[1] == 9 * 2
