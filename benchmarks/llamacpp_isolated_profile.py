"""Where the shipped default's isolated time goes on llama.cpp, and what an adapter switch costs.

The default (isolated, tail 32, its activated adapter as a LoRA GGUF) generates 256 tokens after a 256-token
random prompt with a 128-token passage every 16 tokens (new each time: cold; drawn from 4: warm); every
decode call is timed by kind (text into sequence 0, passage segments, the view's tail, single-token steps)
and adapter state. Then a 1-, 16- and 48-token decode is timed with and without an adapter on/off switch
before it (upstream reports a scheduler rebuild after each change of the adapter set).

    python benchmarks/llamacpp_isolated_profile.py
"""

from __future__ import annotations

import collections
import statistics
import time

from flashback_integrations import FlashBackConfig, FlashBackModel, Passage
from flashback_integrations.bench.models import random_id_source
from flashback_integrations.loading.backends import default_isolated_export


def profile(fb: FlashBackModel) -> None:
    backend = fb.backend
    stats: dict = collections.defaultdict(lambda: [0, 0.0, 0])
    decode = backend._decode

    def timed_decode(tokens, logits):
        started = time.perf_counter()
        out = decode(tokens, logits)
        seq = tokens[0][2]
        kind = ("segment" if seq >= 2 else "tail" if seq == 1 else "text") + (" x1" if len(tokens) == 1 else " xN")
        entry = stats[(kind, backend._lora_on)]
        entry[0] += 1
        entry[1] += time.perf_counter() - started
        entry[2] += len(tokens)
        return out

    backend._decode = timed_decode
    ids = random_id_source(fb, 0)
    pool = [tuple(ids(128)) for _ in range(4)]
    config = FlashBackConfig(mode="isolated", stride=16, num_passages=1, max_doc_tokens=128, tail_tokens=32)
    for warm in (False, True):
        drawn = iter(range(10**6))

        def retriever(query, k, warm=warm, drawn=drawn):
            return [Passage(text="", token_ids=pool[next(drawn) % 4] if warm else tuple(ids(128)))]

        fb.generate(ids(64), retriever, config=config, max_new_tokens=40, ignore_eos=True)  # warm-up
        stats.clear()
        started = time.perf_counter()
        fb.generate(ids(256), retriever, config=config, max_new_tokens=256, ignore_eos=True)
        print(f"{'warm' if warm else 'cold'}: {1000 * (time.perf_counter() - started) / 256:.1f} ms/token")
        for (kind, lora), (calls, seconds, tokens) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
            print(f"  {kind:<10} lora={lora!s:<5} {calls:>4} calls {seconds:6.2f} s {tokens:>5} tokens, "
                  f"{1000 * seconds / calls:.1f} ms/call")  # fmt: skip
    backend._decode = decode
    started = time.perf_counter()
    fb.generate(ids(256), config=FlashBackConfig(mode="none"), max_new_tokens=256, ignore_eos=True)
    print(f"none: {1000 * (time.perf_counter() - started) / 256:.1f} ms/token")


def switch_cost(fb: FlashBackModel) -> None:
    backend = fb.backend
    ids = random_id_source(fb, 0)(256)
    backend._set_lora(False)
    backend._text_to(ids, need_logits=True)

    def median_ms(n: int, switch: bool, repeats: int = 30) -> float:
        times = []
        for _ in range(repeats):
            if switch:  # what a retrieval does between the text and the tail
                backend._set_lora(True)
                backend._set_lora(False)
            backend._seq_rm(0, backend.room + 256 - n)
            started = time.perf_counter()
            backend._decode([(t, backend.room + 256 - n + i, 0) for i, t in enumerate(ids[-n:])], True)
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    for n in (1, 16, 48):
        plain, switched = median_ms(n, False), median_ms(n, True)
        print(f"decode of {n:>2} tokens: {plain:.1f} ms, {switched:.1f} ms right after an on/off switch")


if __name__ == "__main__":
    model = FlashBackModel.from_gguf(str(default_isolated_export("float16")))
    profile(model)
    switch_cost(model)
