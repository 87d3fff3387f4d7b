"""Training checkpoints without pickle: tensors in safetensors, the rest in JSON, written to a temporary
folder and renamed; anything else in a checkpoint folder is refused before it is read."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

CHECKPOINT_DIR = "checkpoints"


def trainable_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_FORMAT = "flashback-train-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_steps(out: Path) -> list[Path]:
    """This run's checkpoint folders, oldest first; anything that is not ours is refused, never loaded."""
    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.name.startswith("step-"))
    pickles = sorted(p.name for p in folder.glob("*.pt"))
    if pickles or foreign:
        raise ConfigError(
            f"{folder} holds files that are not checkpoints of this trainer ({', '.join((pickles + foreign)[:3])}); "
            "pickle checkpoints are never loaded. Remove them or train into another output folder."
        )
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_output_dir(out: Path) -> None:
    """Fail before any work when the adapter cannot be written to ``out`` (a file there, no permission)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"output folder {out}: {blocker} is a file, not a folder; choose another output folder.")
    if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out}: {blocker} is not writable; choose another output folder.")


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_steps(out)
    return found[-1] if found else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise TypeError(f"{type(value).__name__} is not JSON")


def save_training_state(
    folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], optimizer: Any, scheduler: Any
) -> None:
    """A checkpoint without pickle: tensors (weights, optimizer moments, torch RNG) in safetensors,
    the rest (step, config, log, optimizer groups, scheduler, Python RNG) in JSON; written to a temp
    folder and renamed, so a kill leaves either the old or the new checkpoint."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    flat = {f"trainable.{n}": t.detach().cpu().contiguous() for n, t in tensors.items()}
    moments: dict[str, list[str]] = {}
    for index, entry in opt["state"].items():
        moments[str(index)] = sorted(entry)
        for key, value in entry.items():
            flat[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    flat["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and state.get("cuda_rng"):
        flat["rng.cuda"] = torch.cuda.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **{k: v for k, v in state.items() if k != "cuda_rng"},
        "optimizer": {"param_groups": opt["param_groups"], "moments": moments},
        "scheduler": sched,
        "python_rng": random.getstate(),
    }
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(_jsonable(record)))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON record and the tensors of a checkpoint folder, or a ConfigError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        record = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {folder} has no readable state.json ({exc}); remove it and resume from another."
        ) from exc
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder} is not a checkpoint of this trainer (no {CHECKPOINT_FORMAT!r} record).")
    if record.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"checkpoint {folder} has version {record.get('version')}, this trainer reads {CHECKPOINT_VERSION}."
        )
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"checkpoint {folder} has a damaged state.safetensors ({exc}); remove the folder.") from exc
    problem = _record_problem(record, tensors)
    if problem:
        raise ConfigError(
            f"checkpoint {folder} is damaged ({problem}); remove the folder and resume from an earlier checkpoint."
        )
    return record, tensors


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "step": int,
    "log": list,
    "elapsed_s": (int, float),
    "optimizer": dict,
    "scheduler": dict,
    "python_rng": list,
}


def _record_problem(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """What makes a checkpoint unusable, checked before anything is restored (nothing half-applied)."""
    for key, kind in _RECORD_TYPES.items():
        if not isinstance(record.get(key), kind):
            return f"state.json's {key!r} is missing or not a {getattr(kind, '__name__', 'number')}"
    opt = record["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("moments"), dict):
        return "state.json's optimizer record lacks param_groups or moments"
    for index, keys in opt["moments"].items():
        if not isinstance(keys, list) or any(f"optim.{index}.{key}" not in tensors for key in keys):
            return f"the optimizer moments of parameter {index} are missing from state.safetensors"
    rng = record["python_rng"]
    if len(rng) != 3 or not isinstance(rng[1], list):
        return "state.json's python_rng is not a random.getstate() record"
    if "rng.torch" not in tensors:
        return "state.safetensors lacks rng.torch"
    return None


def restore_state(
    record: dict[str, Any], tensors: dict[str, torch.Tensor], params: dict[str, Any], optimizer: Any, scheduler: Any
) -> None:
    trainable = {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
    if set(trainable) != set(params) or any(trainable[n].shape != params[n].shape for n in params):
        raise ConfigError("the checkpoint's weights do not match this model's trainable parameters; same settings?")
    for name, tensor in trainable.items():
        params[name].data.copy_(tensor)
    groups = record["optimizer"]["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    state = {
        int(index): {key: tensors[f"optim.{index}.{key}"] for key in keys}
        for index, keys in record["optimizer"]["moments"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **record["scheduler"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
