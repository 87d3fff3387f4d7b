"""Floors of the two forwards that decide append / plain decoding, on this machine.

Runs every linear layer of the default model (fp32, CPU) alone, as a 144-id re-feed (16 re-fed + 128
passage ids) and as a 1-id decode step would, with no attention, norms or Python around them. Append
costs (15 + refeed/decode) / 16 of plain decoding, so it is within 1.05x only if a re-feed costs at
most 1.8 decode steps; these floors say how fast a decode step would then have to be. It then sums
the committed ``bench forward`` costs over the retrieval cycles of METHOD.md's runs (prompt 512,
a cycle every 16 tokens up to T - 128), to predict the full ``bench speed`` runs and to bound them
with the re-feed at its floor.
Run: python benchmarks/cpu_floors.py
"""

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flashback_integrations.bench.speed import load_model

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
measured = np.array([r["total_tokens"] for r in runs])


def cost(key: str, lengths: np.ndarray) -> np.ndarray:
    return np.interp(lengths, measured, [r[key] for r in runs])


for total in (1024, 2048, 4096):
    prompt = min(512, total // 4)
    lengths = np.array([prompt + j + 130 for j in range(0, total - 128 - prompt, 16)])
    decode, refeed, recompute = (cost(k, lengths) for k in ("decode_ms", "refeed_ms", "recompute_ms"))
    plain, append, prepend = (16 * decode).sum(), (refeed + 15 * decode).sum(), (recompute + 15 * decode).sum()
    at_floor = len(lengths) * refeed_floor + (15 * decode).sum()
    print(
        f"T={total}: predicted prepend/append {prepend / append:.2f}x, append/plain {append / plain:.2f}; "
        f"with the re-feed at its floor: prepend/append <= {prepend / at_floor:.2f}x, "
        f"append/plain >= {at_floor / plain:.2f}"
    )
