"""Floors of the two forwards that decide append / plain decoding, on this machine.

Runs every linear layer of the default model (fp32, CPU) alone, as a 144-id re-feed (16 re-fed + 128
passage ids) and as a 1-id decode step would, with no attention, norms or Python around them. Append
costs (15 + refeed/decode) / 16 of plain decoding, so it is within 1.05x only if a re-feed costs at
most 1.8 decode steps; these floors say how fast a decode step would then have to be. It then sums
the committed ``bench forward`` costs over docs/method.md's runs (``predict_runs``) to predict the full
``bench speed`` runs, and bounds them with the re-feed at its floor.
Run: python benchmarks/cpu_floors.py
"""

import json
import statistics
import time
from pathlib import Path

import torch

from flashback_integrations.bench.forward import predict_runs
from flashback_integrations.bench.models import load_model

fb = load_model("default", "float32", "cpu")
head = fb.model.get_output_embeddings()
body = [m for m in fb.model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def linear_pass_ms(rows: int, repeats: int = 7) -> float:
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in body}
    last = torch.randn(1, head.in_features)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for m in body:
                torch.nn.functional.linear(inputs[m.in_features], m.weight)
            torch.nn.functional.linear(last, head.weight)  # last-position logits only
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[1:])


params = sum(m.weight.numel() for m in body)
refeed_floor, decode = linear_pass_ms(144), linear_pass_ms(1)
flops = 2 * params * 144 + 2 * head.weight.numel()
print(f"{len(body)} body linears, {params / 1e6:.1f}M weights (+ {head.weight.numel() / 1e6:.1f}M lm_head)")
print(f"144-id linears alone: {refeed_floor:.0f} ms ({flops / refeed_floor / 1e6:.0f} GFLOP/s)")
print(f"1-id linears alone (reading {4 * (params + head.weight.numel()) / 1e6:.0f} MB of weights): {decode:.1f} ms")
print(f"append <= 1.05x plain needs re-feed <= 1.8 decode steps, so a decode step >= {refeed_floor / 1.8:.0f} ms")

runs = json.loads((Path(__file__).parent / "results/forward_cpu_smollm2.json").read_text())["runs"]
totals = [1024, 2048, 4096]
for p, floor in zip(predict_runs(runs, totals), predict_runs(runs, totals, refeed_ms=refeed_floor), strict=True):
    print(
        f"T={p['total_tokens']}: predicted prepend/append {p['prepend_over_append']}x, append/plain "
        f"{p['append_over_none']}; with the re-feed at its floor: prepend/append <= {floor['prepend_over_append']}x, "
        f"append/plain >= {floor['append_over_none']}"
    )
