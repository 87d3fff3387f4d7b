"""What grammar-constrained decoding costs per token on the default model (CPU): the same chat prompt
generated free, under a JSON schema, and as a forced tool call, interleaved over several rounds so
drift hits every row alike.

    python benchmarks/constrained_overhead.py benchmarks/results/constrained_overhead.json [ROUNDS]

Reports decode ms per generated token (first token to last, so the prompts' different prefill is left
out; median over rounds) and the mask's own share: the time llguidance
takes to compute and apply the mask, measured inside the same runs.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from flashback_integrations import FlashBackConfig, FlashBackModel, TokenEvent
from flashback_integrations.engine import constrained
from flashback_integrations.engine.constrained import Grammar
from flashback_integrations.tools import call_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QUESTION = "Describe Paris as JSON with city, country, population and up to three landmarks."


class MaskTimer:
    """Wraps Constraint.mask to add up the time spent computing and applying masks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._real = constrained.Constraint.mask

    def __enter__(self) -> "MaskTimer":
        timer = self

        def timed(this, logits):
            started = time.perf_counter()
            out = timer._real(this, logits)
            timer.seconds += time.perf_counter() - started
            timer.calls += 1
            return out

        constrained.Constraint.mask = timed
        return self

    def __exit__(self, *exc) -> None:
        constrained.Constraint.mask = self._real


def main(out: str, rounds: int = 5) -> None:
    torch.set_num_threads(2)
    fb = FlashBackModel.from_pretrained("default")
    config = FlashBackConfig(mode="none")
    prompts = {
        "free": (fb.chat_ids([{"role": "user", "content": QUESTION}]), None),
        "json schema": (fb.chat_ids([{"role": "user", "content": QUESTION}]), Grammar.json_schema(SCHEMA)),
        "forced tool call": (
            fb.chat_ids([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS),
            call_grammar(TOOLS),
        ),
    }
    fb.generate(prompts["free"][0], config=config, max_new_tokens=4)  # warm-up
    rows: dict[str, dict[str, list[float]]] = {name: {"ms_per_token": [], "mask_ms_per_token": []} for name in prompts}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name, (ids, grammar) in prompts.items():
            with MaskTimer() as timer:
                # decode only: from the first token (after the prompt's prefill) to the last; the free
                # row ignores EOS so it makes as many tokens as the others
                stamps = [
                    time.perf_counter()
                    for e in fb.stream(
                        ids, config=config, max_new_tokens=48, grammar=grammar, ignore_eos=grammar is None
                    )
                    if isinstance(e, TokenEvent)
                ]
            n = len(stamps) - 1
            elapsed = stamps[-1] - stamps[0]
            tokens[name] = n
            rows[name]["ms_per_token"].append(1000 * elapsed / n)
            rows[name]["mask_ms_per_token"].append(1000 * timer.seconds / n)
            print(f"round {r + 1}/{rounds} {name}: {n} tokens, {1000 * elapsed / n:.1f} ms/token", flush=True)
    summary = {
        name: {
            "tokens": tokens[name],
            "ms_per_token": round(statistics.median(v["ms_per_token"]), 2),
            "mask_ms_per_token": round(statistics.median(v["mask_ms_per_token"]), 3),
        }
        for name, v in rows.items()
    }
    free = summary["free"]["ms_per_token"]
    for name, row in summary.items():
        row["vs_free"] = round(row["ms_per_token"] / free, 3)
        mask = row["mask_ms_per_token"]
        print(f"{name:18s} {row['ms_per_token']:7.2f} ms/token  mask {mask:.3f} ms/token  x{row['vs_free']}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(
        json.dumps(
            {
                "command": f"python benchmarks/constrained_overhead.py {out} {rounds}",
                "model": "default (SmolLM2-135M-Instruct, fp32, CPU, 2 threads), mode none, greedy",
                "rounds": rounds,
                "rows": summary,
                "raw": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)
