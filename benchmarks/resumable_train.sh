# Sourced by the CPU training scripts of issue 14: one resumable `flashback train` per row, so a run spread
# over sessions (and machines) continues where it stopped. $MINUTES is the budget of the whole call: a row
# that finishes early hands what is left to the next row, and the call exits when the budget runs out, so a
# session can give it exactly the time it has.

finished() {  # the adapter in $1 has trained all its steps
    .venv/bin/python - "$1" <<'PY'
import json, sys
from pathlib import Path
log = Path(sys.argv[1]) / "training_log.json"
record = json.loads(log.read_text())["record"] if log.exists() else {}
steps = record.get("train_config", {}).get("steps")
sys.exit(0 if steps and record.get("steps_done") == steps else 1)  # no log yet: not finished
PY
}

train_row() {  # OUT, then every `flashback train` option of the row (--max-minutes and --resume are added)
    local out=$1
    shift
    if finished "$out"; then
        echo "$out: all steps done"
        return
    fi
    local left=$(( MINUTES - SECONDS / 60 ))  # SECONDS: bash's clock since the script started
    if [ "$left" -lt 10 ]; then  # model load, teacher, first validation: not worth starting a row
        echo "$out: not started, ${left} of $MINUTES minutes left; rerun this script (the checkpoints stay on this machine)"
        exit 0
    fi
    local resume=()
    if [ -d "$out/checkpoints" ]; then resume=(--resume); fi
    .venv/bin/flashback train "$out" --max-minutes "$left" "${resume[@]}" "$@"
    finished "$out" || { echo "$out: stopped after $MINUTES minutes; rerun this script to continue from $out"; exit 0; }
}
