"""Paired ratios of every scored row to two reference rows (no retrieval, prepend + LoRA + MT), from the
per-target sums an `eval ppl` run keeps in its .partial.json; writes STEM_ratios.{json,md}.

    python benchmarks/ppl_ratios.py benchmarks/results/ppl_isolated_whatsnew480
    python benchmarks/ppl_ratios.py STEM OTHER_STEM ...   # rows scored under several stems, rows in progress
                                                           # included, all cut to the targets every row has
    ... --out OUT_STEM                                     # write OUT_STEM_ratios.* instead of STEM_ratios.*
    ... --vs 'isolated + prepend adapter (tail 32)'        # one more reference column (a row's name)
    ... --finished                                         # leave out rows still in progress (all targets
                                                           # of the finished rows, not the shortest row's)

A row of another stem named like an earlier one but scored otherwise (another adapter) is kept beside it as
"NAME [OTHER_STEM]"; the references are always the first stem's rows.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from flashback_integrations.training.perplexity import bootstrap

REFERENCES = ("no retrieval", "prepend + LoRA + MT")


def main(
    stem: str, *others: str, out_stem: str | None = None, extra: tuple[str, ...] = (), finished: bool = False
) -> None:
    partial = json.loads(Path(f"{stem}.partial.json").read_text())
    rows = {json.loads(k)["name"]: np.asarray(v) for k, v in partial["rows"].items()}
    if others:  # an interim check: the first targets every row has scored (the same targets for every row)
        keys: dict[str, str] = {}
        for path in (stem, *others):
            state = json.loads(Path(f"{path}.partial.json").read_text())
            if state["examples_digest"] != partial["examples_digest"]:
                raise SystemExit(f"{path} scored other examples than {stem}")
            for src in (state["rows"], {} if finished else state.get("in_progress") or {}):
                for key, sums in src.items():
                    name = json.loads(key)["name"]
                    if name in keys and keys[name] != key:
                        name = f"{name} [{Path(path).name}]"
                    if len(sums):
                        keys.setdefault(name, key)
                        rows[name] = np.asarray(sums)
        common = min(len(v) for v in rows.values())
        rows = {name: v[:common] for name, v in rows.items()}
    references = (*REFERENCES, *extra)
    missing = [ref for ref in references if ref not in rows]
    if missing:
        raise SystemExit(f"no row named {missing}; the rows are {sorted(rows)} (pass one of them to --vs)")
    out: dict[str, dict[str, float]] = {name: {} for name in rows}
    for ref in references:
        for name, entry in bootstrap(rows, 16, reference=ref).items():
            out[name].update({k: entry[k] for k in ("ppl", "ci_low", "ci_high")})
            if "ratio_to_reference" in entry:
                out[name][f"vs {ref}"] = [entry["ratio_to_reference"], entry["ratio_ci_low"], entry["ratio_ci_high"]]
    header = " | ".join(f"vs {r}" for r in references)
    lines = [f"| row | PPL (95% CI) | {header} |", "|---" * (2 + len(references)) + "|"]
    for name, e in out.items():
        cells = [
            f"{e[f'vs {r}'][0]:.3f} ({e[f'vs {r}'][1]:.3f}-{e[f'vs {r}'][2]:.3f})" if f"vs {r}" in e else "–"
            for r in references
        ]
        lines.append(f"| {name} | {e['ppl']:.2f} ({e['ci_low']:.2f}-{e['ci_high']:.2f}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    targets = len(next(iter(rows.values())))
    out_stem = out_stem or stem
    Path(f"{out_stem}_ratios.json").write_text(
        json.dumps({"targets": targets, "digest": partial["examples_digest"], "rows": out}, indent=1)
    )
    Path(f"{out_stem}_ratios.md").write_text(f"{targets} targets, paired 95% bootstrap intervals\n\n{table}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stems", nargs="+", help="result stems (without .partial.json); the first gives the references")
    parser.add_argument("--out", help="output stem (default: the first stem)")
    parser.add_argument("--vs", action="append", default=[], metavar="ROW", help="one more reference row, by name")
    parser.add_argument("--finished", action="store_true", help="leave out the rows still in progress")
    args = parser.parse_args()
    main(*args.stems, out_stem=args.out, extra=tuple(args.vs), finished=args.finished)
