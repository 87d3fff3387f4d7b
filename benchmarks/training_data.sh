#!/usr/bin/env bash
# The CPU-trained adapters' data (the shipped isolated adapter, the sweep, the paper's rows at the same budget),
# rebuilt instead of committed: `flashback data build` is deterministic (seed 0, BM25 over the same documents), so
# the example lines match benchmarks/training_data.sha256 (the header, which records times and paths, is not
# hashed). The example lines record the docs' path: build from /usr/share/doc/python3.11/html/_sources
# (apt-get install python3.11-doc) for the digests to match.
#
#   benchmarks/training_data.sh [OUT]        # OUT defaults to benchmarks/data (git-ignored)
set -euo pipefail
OUT=${1:-benchmarks/data}
D=${DOCS:-/usr/share/doc/python3.11/html/_sources}
FB=${FB:-.venv/bin/flashback}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
if [ ! -f "$OUT/train.jsonl.gz" ] || [ ! -f "$OUT/val.jsonl.gz" ]; then
    "$FB" data build "$OUT/train.jsonl.gz" --docs "$D" --exclude 'whatsnew/*' --val-out "$OUT/val.jsonl.gz" \
        --val-fraction 0.05 --max-val-examples 512 --max-examples 20000 --seed 0
fi
# the 256 validation targets of every CPU run: a seeded subset (seed 0) of the 512, in file order
"$PY" - "$OUT" <<'PY'
import gzip
import json
import random
import sys
from pathlib import Path

val = Path(sys.argv[1]) / "val.jsonl.gz"
header, *lines = gzip.open(val, "rt", encoding="utf-8").read().splitlines()
keep = sorted(random.Random(0).sample(range(len(lines)), 256))  # as load_examples(val, 256, seed=0) picks them
subset = {**json.loads(header), "subset": {"examples": 256, "of": len(lines), "seed": 0}}
with gzip.open(val.with_name("val256.jsonl.gz"), "wt", encoding="utf-8") as fh:
    fh.write("\n".join([json.dumps(subset), *(lines[i] for i in keep)]) + "\n")
PY
cd "$OUT"
for f in train val val256; do
    printf "%s  %s.jsonl.gz\n" "$(zcat "$f.jsonl.gz" | tail -n +2 | sha256sum | cut -d' ' -f1)" "$f"
done > digests.txt
cd - > /dev/null
if diff -u benchmarks/training_data.sha256 "$OUT/digests.txt"; then
    echo "$OUT: the examples match benchmarks/training_data.sha256"
else
    echo "$OUT: the examples differ from the recorded ones (other docs or another flashback version?)" >&2
    exit 1
fi
