"""What an activated adapter costs per generated token against merged weights (CPU, default model).

An activated adapter cannot be merged (the head must stay the base model), so every forward carries the
LoRA matrices. This times the same generation with (a) the adapter merged into the weights and (b) the
shipped activated adapter, in mode none and isolated (a recurring passage, as a real corpus repeats
itself), interleaved so the VM's drift hits both alike.

    python benchmarks/activation_overhead.py [--adapter DIR] [--tokens 128] [--repeats 3] [--out FILE]
"""

import argparse
import json
import statistics
import time

import torch

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.engine.activation import is_activated
from flashback_integrations.loading.adapter import load_adapter
from flashback_integrations.loading.resolve import load_pretrained, resolve_model
from flashback_integrations.loading.shipped import shipped_adapter

PASSAGE = (
    "The json module encodes Python objects as JSON text with json.dumps and writes them to a file with "
    "json.dump; indent=2 pretty-prints the output and sort_keys=True orders the keys."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=str(shipped_adapter("isolated")))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/activation_overhead_cpu.json")
    args = ap.parse_args()
    source = resolve_model("default")
    activated = FlashBackModel.from_pretrained("default", adapter=args.adapter)
    assert is_activated(activated.model)
    base = load_pretrained(source, "model", dtype=torch.float32)
    merged_model, tok, _ = load_adapter(base, load_pretrained(source, "tokenizer"), args.adapter, merge=False)
    merged = FlashBackModel(merged_model.merge_and_unload(), tok)  # all tokens through the adapter: merged
    prompt = activated.chat_ids([{"role": "user", "content": "How do I pretty-print JSON with the json module?"}])
    configs = {
        "none": FlashBackConfig(mode="none"),
        # both at the adapter's own tail (the merged model has no manifest to take it from)
        "isolated": FlashBackConfig(
            mode="isolated", stride=16, max_doc_tokens=128, tail_tokens=activated.config.tail_tokens
        ),
    }
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for mode, config in configs.items():
            for name, fb in (("merged", merged), ("activated", activated)):
                retriever = (lambda q, k: [PASSAGE]) if config.retrieves else None
                fb.generate(prompt, retriever, config=config, max_new_tokens=4, ignore_eos=True)  # warm-up
                started = time.perf_counter()
                fb.generate(prompt, retriever, config=config, max_new_tokens=args.tokens, ignore_eos=True)
                times.setdefault(f"{mode}/{name}", []).append(1000 * (time.perf_counter() - started) / args.tokens)
    result = {k: round(statistics.median(v), 2) for k, v in times.items()}
    for mode in configs:
        result[f"{mode}/overhead"] = round(result[f"{mode}/activated"] / result[f"{mode}/merged"] - 1, 3)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as fh:
        json.dump(
            {
                "ms_per_token": result,
                "tokens": args.tokens,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "tail_tokens": activated.config.tail_tokens,
                "command": "python benchmarks/activation_overhead.py",
            },
            fh,
            indent=1,
        )


if __name__ == "__main__":
    main()
