"""Rescore one row on a span of targets in this process and compare its per-target sums with saved rows.

Why: a row scored across sessions (a resumed run, another process) may differ from a row scored in one
session by float rounding alone (1e-4 nats on a 16-token sum). Rescoring the span here tells rounding
from a real difference: equal sums here mean the rows are the same function.

    python benchmarks/rescore_span.py EXAMPLES ROW START END PARTIAL:NAME [PARTIAL:NAME ...] --out OUT.json
"""

import argparse
import json
import time
from pathlib import Path

from flashback_integrations.training.examples import load_examples
from flashback_integrations.training.perplexity import paper_rows, score_row, with_tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples")
    parser.add_argument("row", help="a row name of `flashback eval ppl` (adapters from the flags below)")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("saved", nargs="+", help="PARTIAL_JSON:ROW_NAME, saved rows to compare with")
    parser.add_argument("--prepend-adapter")
    parser.add_argument("--isolated-adapter")
    parser.add_argument("--tail-tokens", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    examples = load_examples(args.examples)[0]
    if not 0 <= args.start < args.end <= len(examples):
        raise SystemExit(f"span {args.start}:{args.end} is outside the {len(examples)} examples")
    rows, _ = paper_rows(None, args.prepend_adapter, None, args.isolated_adapter)
    if args.tail_tokens is not None:
        rows = with_tail(rows, args.tail_tokens)
    chosen = [r for r in rows if r.name == args.row]
    if not chosen:
        raise SystemExit(f"no row {args.row!r}; rows with the given adapters: {[r.name for r in rows]}")
    row = chosen[0]
    began = time.monotonic()
    sums = score_row(row, examples[args.start : args.end], device="cpu")
    report: dict = {"row": row.name, "span": [args.start, args.end], "seconds": round(time.monotonic() - began, 1)}
    for spec in args.saved:
        path, _, name = spec.partition(":")
        state = json.loads(Path(path).read_text())
        saved = [v for k, v in state["rows"].items() if json.loads(k)["name"] == name]
        if not saved:
            raise SystemExit(f"{path} has no finished row {name!r}")
        span = saved[0][args.start : args.end]
        diffs = [abs(a - b) for a, b in zip(sums, span, strict=True)]
        report[spec] = {"identical": sum(d == 0 for d in diffs), "of": len(diffs), "max_abs_diff": max(diffs)}
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
