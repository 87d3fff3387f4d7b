"""Validation NLL (nats per target token) of one adapter read in one layout at several tail lengths,
so window lengths are chosen on validation, never on the reported test split.

    python benchmarks/val_sweep.py VAL.jsonl.gz OUT.json ADAPTER LAYOUT TAIL[,TAIL...]

Rows are merged into OUT.json (one key per adapter/layout/tail), so several runs build one table.
One thread, so it can run beside a training job.
"""

import json
import sys
import time
from pathlib import Path

import torch
from val_references import val_loss  # this folder is on sys.path when run as a script

from flashback_integrations.model import FlashBackModel
from flashback_integrations.training.examples import load_examples


def main(val_file: str, out: str, adapter: str, layout: str, tails: str) -> None:
    torch.set_num_threads(1)
    examples = load_examples(val_file)[0]
    path = Path(out)
    result = json.loads(path.read_text()) if path.exists() else {"val_file": val_file, "val_loss": {}}
    fb = FlashBackModel.from_pretrained("default", adapter=adapter, merge_adapter=False)
    marks = adapter != "none"
    for tail in (int(t) for t in tails.split(",")):
        started = time.time()
        loss = val_loss(fb, examples, layout, marks, tail)
        key = f"{adapter} | {layout} | tail {tail}"
        result["val_loss"][key] = loss
        result["examples"] = len(examples)
        print(key, round(result["val_loss"][key], 4), f"{time.time() - started:.0f}s", flush=True)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:6])
