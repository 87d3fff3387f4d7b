"""A/B of the engine's cache against transformers' DynamicCache on the default model (CPU, fp32).

Interleaved medians of a decode step and a 144-id re-feed at 2K/4K cached ids, and of a fresh
1,900-id recompute (prepend's retrieval forward), for a batch of ``--rows`` contexts.
Run: python benchmarks/cache_ab.py [--rows 8] [--lengths 2048,4096]
"""

import argparse
import statistics
import time

from transformers import DynamicCache

import flashback_integrations.engine.kv as kvcache
from flashback_integrations.bench.models import load_model, random_id_source

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=1)
parser.add_argument("--lengths", default="2048,4096")
parser.add_argument("--repeats", type=int, default=9)
args = parser.parse_args()

fb = load_model("default", "float32", "cpu")
ids = random_id_source(fb, 0)
caches = {"DynamicCache": DynamicCache, "engine cache": kvcache._RoomyCache}


def with_cache(cls):
    kvcache._RoomyCache = cls  # KVContext builds whatever this names
    return kvcache.KVContext(fb.model)


def rows_of(n):
    return [ids(n) for _ in range(args.rows)]


for total in (int(x) for x in args.lengths.split(",")):
    state = {name: (with_cache(cls), rows_of(total - 1)) for name, cls in caches.items()}
    for kv, base in state.values():
        kv.next_logits_rows(base)
    samples = {name: {"decode": [], "refeed": []} for name in caches}
    for rep in range(args.repeats):
        for name, cls in caches.items():
            kvcache._RoomyCache = cls
            kv, base = state[name]
            t = time.perf_counter()
            kv.next_logits_rows([b + ids(1) for b in base])
            decode = time.perf_counter() - t
            refeed_ctx = [b[: total - 144] + ids(144) for b in base]
            t = time.perf_counter()
            kv.next_logits_rows(refeed_ctx)
            refeed = time.perf_counter() - t
            state[name] = (kv, [c[:-1] for c in refeed_ctx])
            if rep:
                samples[name]["decode"].append(1000 * decode)
                samples[name]["refeed"].append(1000 * refeed)
    for name, s in samples.items():
        print(
            f"T={total} rows={args.rows} {name}: decode {statistics.median(s['decode']):.1f} ms, "
            f"re-feed {statistics.median(s['refeed']):.0f} ms",
            flush=True,
        )
recompute = {name: [] for name in caches}
for rep in range(4):
    for name, cls in caches.items():
        kv, ctx = with_cache(cls), rows_of(1900)
        t = time.perf_counter()
        kv.next_logits_rows(ctx)
        if rep:
            recompute[name].append(time.perf_counter() - t)
for name, v in recompute.items():
    print(f"recompute 1900 ids x {args.rows} rows, {name}: {statistics.median(v):.2f} s")
kvcache._RoomyCache = caches["engine cache"]
