"""A/B of the engine's cache against transformers' DynamicCache on the default model (CPU, fp32).

Interleaved medians of a decode step and a 144-id re-feed at 2K/4K cached ids, and of a fresh
1,900-id recompute (prepend's retrieval forward). Run: python benchmarks/cache_ab.py
"""

import statistics
import time

from transformers import DynamicCache

import flashback_integrations.engine as engine
from flashback_integrations.bench.speed import load_model, random_id_source

fb = load_model("default", "float32", "cpu")
ids = random_id_source(fb, 0)
caches = {"DynamicCache": DynamicCache, "engine cache": engine._RoomyCache}


def with_cache(cls):
    engine._RoomyCache = cls  # KVContext builds whatever this names
    return engine.KVContext(fb.model)


for total in (2048, 4096):
    state = {name: (with_cache(cls), ids(total - 1)) for name, cls in caches.items()}
    for kv, base in state.values():
        kv.next_logits(base)
    samples = {name: {"decode": [], "refeed": []} for name in caches}
    for rep in range(9):
        for name, cls in caches.items():
            engine._RoomyCache = cls
            kv, base = state[name]
            t = time.perf_counter()
            kv.next_logits(base + ids(1))
            decode = time.perf_counter() - t
            refeed_ctx = base[: total - 144] + ids(144)
            t = time.perf_counter()
            kv.next_logits(refeed_ctx)
            refeed = time.perf_counter() - t
            state[name] = (kv, refeed_ctx[:-1])
            if rep:
                samples[name]["decode"].append(1000 * decode)
                samples[name]["refeed"].append(1000 * refeed)
    for name, s in samples.items():
        print(
            f"T={total} {name}: decode {statistics.median(s['decode']):.1f} ms, "
            f"re-feed {statistics.median(s['refeed']):.0f} ms"
        )
recompute = {name: [] for name in caches}
for rep in range(4):
    for name, cls in caches.items():
        kv, ctx = with_cache(cls), ids(1900)
        t = time.perf_counter()
        kv.next_logits(ctx)
        if rep:
            recompute[name].append(time.perf_counter() - t)
for name, v in recompute.items():
    print(f"recompute 1900 ids, {name}: {statistics.median(v):.2f} s")
engine._RoomyCache = caches["engine cache"]
