"""Paired ratios of every scored row to two reference rows (no retrieval, prepend + LoRA + MT), from the
per-target sums an `eval ppl` run keeps in its .partial.json; writes STEM_ratios.{json,md}.

    python benchmarks/ppl_ratios.py benchmarks/results/ppl_isolated_whatsnew480
    python benchmarks/ppl_ratios.py STEM OTHER_STEM ...   # rows scored under several stems, rows in progress
                                                           # included, all cut to the targets every row has
"""

import json
import sys
from pathlib import Path

import numpy as np

from flashback_integrations.training.perplexity import bootstrap

REFERENCES = ("no retrieval", "prepend + LoRA + MT")


def main(stem: str, *others: str) -> None:
    partial = json.loads(Path(f"{stem}.partial.json").read_text())
    rows = {json.loads(k)["name"]: np.asarray(v) for k, v in partial["rows"].items()}
    if others:  # an interim check: the first targets every row has scored (the same targets for every row)
        for path in (stem, *others):
            state = json.loads(Path(f"{path}.partial.json").read_text())
            if state["examples_digest"] != partial["examples_digest"]:
                raise SystemExit(f"{path} scored other examples than {stem}")
            for src in (state["rows"], state.get("in_progress") or {}):
                rows.update({json.loads(k)["name"]: np.asarray(v) for k, v in src.items() if len(v)})
        common = min(len(v) for v in rows.values())
        rows = {name: v[:common] for name, v in rows.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in rows}
    for ref in REFERENCES:
        for name, entry in bootstrap(rows, 16, reference=ref).items():
            out[name].update({k: entry[k] for k in ("ppl", "ci_low", "ci_high")})
            if "ratio_to_reference" in entry:
                out[name][f"vs {ref}"] = [entry["ratio_to_reference"], entry["ratio_ci_low"], entry["ratio_ci_high"]]
    lines = [f"| row | PPL (95% CI) | vs {REFERENCES[0]} | vs {REFERENCES[1]} |", "|---|---|---|---|"]
    for name, e in out.items():
        cells = [
            f"{e[f'vs {r}'][0]:.3f} ({e[f'vs {r}'][1]:.3f}-{e[f'vs {r}'][2]:.3f})" if f"vs {r}" in e else "–"
            for r in REFERENCES
        ]
        lines.append(f"| {name} | {e['ppl']:.2f} ({e['ci_low']:.2f}-{e['ci_high']:.2f}) | {cells[0]} | {cells[1]} |")
    table = "\n".join(lines)
    print(table)
    targets = len(next(iter(rows.values())))
    Path(f"{stem}_ratios.json").write_text(
        json.dumps({"targets": targets, "digest": partial["examples_digest"], "rows": out}, indent=1)
    )
    Path(f"{stem}_ratios.md").write_text(f"{targets} targets, paired 95% bootstrap intervals\n\n{table}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
