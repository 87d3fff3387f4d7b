"""What one append re-feed costs on each engine, against one decode step (CPU, the default model).

Append mode's cost on top of plain decoding is one re-feed per retrieval: the block and the last stride
(here 128 + 16 = 144 ids) fed again after the text before them (here 1,904 ids, so the context ends at
2,048). This times exactly that, on torch (fp32, transformers' cache cropped) and on llama.cpp for each
GGUF type (its KV cache cropped), with one decode step at the same length beside it. It explains why
llama.cpp's lead over torch shrinks in append mode on a CPU without int8 dot-product instructions: a
re-feed is compute-bound, and there fp32 GEMM is about as fast as llama.cpp's 4- and 8-bit kernels.

    python benchmarks/refeed_cost.py [--dtypes q4_0,q4_1,q8_0,float32] [--out FILE]
"""

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

HEAD, REFEED, REPEATS, STEPS = 1904, 144, 4, 10


def _ids(vocab: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(1000, min(vocab, 40000)) for _ in range(HEAD + REFEED)]


def _time_torch() -> dict[str, float]:
    from transformers import DynamicCache

    from flashback_integrations.loading.resolve import load_pretrained, resolve_model

    model = load_pretrained(resolve_model("default"), "model", dtype="float32").eval()
    ids = torch.tensor([_ids(model.config.vocab_size)])

    def feed(start: int, end: int, cache: DynamicCache) -> float:
        extra = cache.get_seq_length() - start
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count drops that many tokens from the end
        positions = torch.arange(start, end)[None]
        t = time.perf_counter()
        model(input_ids=ids[:, start:end], past_key_values=cache, position_ids=positions, use_cache=True)
        return time.perf_counter() - t

    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids[:, :HEAD], past_key_values=cache, use_cache=True)
        refeed = [feed(HEAD, HEAD + REFEED, cache) for _ in range(REPEATS)]
        step = [feed(HEAD + REFEED - 1, HEAD + REFEED, cache) for _ in range(STEPS)]
    return {"refeed_ms": statistics.median(refeed) * 1e3, "step_ms": statistics.median(step) * 1e3}


def _time_llamacpp(gguf: str) -> dict[str, float]:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_threads=os.cpu_count() or 1, n_batch=512, verbose=False)
    ids = _ids(llama.n_vocab())
    llama.eval(ids[:HEAD])

    def feed(start: int, end: int) -> float:
        llama.n_tokens = start  # as engine/llamacpp.py crops: eval() drops the KV cache from here on
        t = time.perf_counter()
        llama.eval(ids[start:end])
        return time.perf_counter() - t

    refeed = [feed(HEAD, HEAD + REFEED) for _ in range(REPEATS)]
    step = [feed(HEAD + REFEED - 1, HEAD + REFEED) for _ in range(STEPS)]
    return {"refeed_ms": statistics.median(refeed) * 1e3, "step_ms": statistics.median(step) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="q4_0,q4_1,q8_0,float32", help="GGUF types to time on llama.cpp")
    parser.add_argument("--out", default="benchmarks/results/refeed_cost.json")
    args = parser.parse_args()
    from flashback_integrations.bench.models import gguf_export

    rows = [{"engine": "torch", "weights": "float32", **_time_torch()}]
    for dtype in args.dtypes.split(","):
        gguf = gguf_export("default", dtype) + "/model.gguf"
        rows.append({"engine": "llama.cpp", "weights": dtype, **_time_llamacpp(gguf)})
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    result = {
        "context_before": HEAD, "refeed_ids": REFEED, "threads": os.cpu_count(), "machine": platform.processor(),
        "int8_dot_product": any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8")),
        "rows": [{**r, "refeed_over_step": r["refeed_ms"] / r["step_ms"]} for r in rows],
        "command": "python benchmarks/refeed_cost.py --dtypes " + args.dtypes,
    }  # fmt: skip
    for r in result["rows"]:
        print(f"{r['engine']:9s} {r['weights']:8s} re-feed of {REFEED} ids {r['refeed_ms']:7.1f} ms, "
              f"decode step {r['step_ms']:5.1f} ms ({r['refeed_over_step']:.1f} steps)")  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
