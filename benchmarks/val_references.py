"""Validation NLL (nats per target token) of the reference rows on a validation example file, to choose
recipes on validation and never on the reported test split.

    python benchmarks/val_references.py VAL.jsonl.gz OUT.json

Rows: prepend + LoRA + MT (flashback_integrations/adapters/smollm2-135m-prepend), that adapter merged and read in the
isolated layout, and no retrieval. One thread, so it can run beside a training job.
"""

import json
import sys
import time

import torch

from flashback_integrations.model import FlashBackModel
from flashback_integrations.training.examples import load_examples
from flashback_integrations.training.scoring import mark_id_list, pad_id_of, target_nll

ROWS = [
    ("prepend + LoRA + MT", "prepend", "flashback_integrations/adapters/smollm2-135m-prepend", True),
    (
        "isolated + prepend adapter (merged, all tokens)",
        "isolated",
        "flashback_integrations/adapters/smollm2-135m-prepend",
        True,
    ),
    ("no retrieval", "none", "none", False),
]


def val_loss(fb: FlashBackModel, examples: list, layout: str, marks: bool, tail_tokens: int = 1) -> float:
    """Mean target-token NLL (nats) of ``examples`` under one layout, 16 examples per forward."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            nll = target_nll(
                fb.model,
                examples[i : i + 16],
                layout,
                fb.mark_ids if marks else None,
                pad_id_of(fb.tokenizer),
                mark_id_list(fb.tokenizer, fb.model),
                tail_tokens=tail_tokens,
            )
            total += float(nll.sum())
    return total / (len(examples) * len(examples[0].tgt))


def main(val_file: str, out: str) -> None:
    torch.set_num_threads(1)
    examples = load_examples(val_file)[0]
    result = {}
    for name, layout, adapter, marks in ROWS:
        started = time.time()
        fb = FlashBackModel.from_pretrained("default", adapter=adapter)
        result[name] = val_loss(fb, examples, layout, marks)
        print(name, round(result[name], 4), f"{time.time() - started:.0f}s", flush=True)
    with open(out, "w") as fh:
        json.dump({"val_file": val_file, "examples": len(examples), "val_loss": result}, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
