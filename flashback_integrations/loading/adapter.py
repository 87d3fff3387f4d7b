"""FlashBack adapters: a PEFT adapter directory plus a manifest that says what it was trained for.

The manifest (``flashback_adapter.json``) records the FlashBack settings, the marking tokens and
a fingerprint of the base model's weights, so loading an adapter onto the wrong base fails loudly
instead of generating garbage.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.activation import ACTIVATION_PASSAGE, activate
from ..engine.layout import MARK_L, MARK_R
from ..errors import AdapterMismatchError, ConfigError

MANIFEST_NAME = "flashback_adapter.json"
_FINGERPRINT_ROWS = 256


def base_fingerprint(model: Any) -> str:
    """A hash of the base model's architecture and embedding rows, stable across dtypes.

    Only rows present before marks were added are hashed, and they are rounded to bfloat16, so
    the same base in fp32 or bf16, with or without the two extra rows, gives the same value.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    emb = base.get_input_embeddings().weight.detach()
    digest = hashlib.sha256()
    shape = [config.model_type, config.hidden_size, getattr(config, "num_hidden_layers", None), emb.shape[1]]
    digest.update(json.dumps(shape).encode())
    rows = emb[: min(_FINGERPRINT_ROWS, emb.shape[0])].to("cpu", torch.bfloat16).contiguous()
    digest.update(rows.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class AdapterManifest:
    base_model: str
    base_fingerprint: str
    flashback_config: dict[str, Any] = field(default_factory=dict)
    mark_tokens: list[str] = field(default_factory=lambda: [MARK_L, MARK_R])
    mark_token_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        Path(directory, MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> AdapterManifest | None:
        path = Path(directory, MANIFEST_NAME)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AdapterMismatchError(
                f"{path} is not readable JSON ({exc}); restore it from the adapter's source."
            ) from exc
        if not isinstance(data, dict) or not isinstance(data.get("base_fingerprint"), str):
            raise AdapterMismatchError(
                f"{path} is not a FlashBack manifest (a JSON object with base_fingerprint, flashback_config, ...)."
            )
        for key, kind in (("flashback_config", dict), ("extra", dict), ("mark_tokens", list), ("mark_token_ids", list)):
            if key in data and not isinstance(data[key], kind):
                raise AdapterMismatchError(f"{path}: {key} must be a JSON {kind.__name__}.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def add_mark_tokens(model: Any, tokenizer: Any) -> tuple[int, int]:
    """Add ``<MARK_L>``/``<MARK_R>`` as special tokens and grow the embeddings if needed."""
    tokenizer.add_special_tokens({"additional_special_tokens": [MARK_L, MARK_R]})
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(MARK_L), tokenizer.convert_tokens_to_ids(MARK_R)


def save_adapter(
    peft_model: Any,
    tokenizer: Any,
    directory: str | Path,
    manifest: AdapterManifest,
    save_tokenizer: bool = True,
) -> None:
    """Write the PEFT adapter (safetensors), the manifest and, if asked, the tokenizer.

    Without the tokenizer (a few MB), loading re-adds the marks named in the manifest to the base
    tokenizer and checks that they get the recorded ids.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The mark rows travel as PEFT trainable tokens; saving whole embedding matrices would make a
    # 135M-model adapter ~100 MB, so skip them when the rows are covered that way.
    configs = getattr(peft_model, "peft_config", {}).values()
    rows_only = any(getattr(c, "trainable_token_indices", None) for c in configs)
    card = directory / "README.md"
    had_card = card.exists()
    peft_model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False if rows_only else "auto")
    if not had_card:  # PEFT's empty model card, naming the local path of the base; the manifest is the card
        card.unlink(missing_ok=True)
    if save_tokenizer:
        tokenizer.save_pretrained(directory)
    manifest.extra[WEIGHTS_DIGEST] = weights_digest(directory)
    manifest.save(directory)


WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_DIGEST = "weights_sha256"


def weights_digest(directory: str | Path) -> str:
    from .resolve import sha256_file

    return sha256_file(Path(directory) / WEIGHTS_FILE)


def _read_adapter(directory: Path, manifest: AdapterManifest | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The adapter's PEFT config and weights, read and checked before any model is touched."""
    from peft import PeftConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterMismatchError(
            f"{directory} has no {WEIGHTS_FILE}; only safetensors adapters are loaded (never pickles)."
        )
    expected = manifest.extra.get(WEIGHTS_DIGEST) if manifest is not None else None
    if expected is not None and weights_digest(directory) != expected:
        raise AdapterMismatchError(
            f"{weights} does not match the digest in its manifest ({str(expected)[:12]}...): the file was changed "
            "or damaged. Restore the adapter folder from its source."
        )
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AdapterMismatchError(f"{directory}/adapter_config.json is not a valid PEFT config ({exc}).") from exc
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise AdapterMismatchError(f"{weights} is damaged or truncated ({exc}); restore it from its source.") from exc
    return config, tensors


def check_adapter_dir(directory: str | Path) -> Path:
    """The adapter folder, or a ConfigError saying what to pass instead."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ConfigError(
            f"{directory} is not an adapter directory (no adapter_config.json). Pass the folder that "
            "`flashback train` or PeftModel.save_pretrained wrote."
        )
    return directory


def load_adapter(
    model: Any, tokenizer: Any, directory: str | Path, merge: bool = True, check_base: bool = True
) -> tuple[Any, Any, AdapterManifest | None]:
    """Apply an adapter directory to ``model``; returns (model, tokenizer, manifest).

    The base check happens before anything is changed, so a refused adapter leaves the model as
    it was.
    """
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel, set_peft_model_state_dict

    from .resolve import load_pretrained

    directory = check_adapter_dir(directory)
    manifest = AdapterManifest.load(directory)
    if manifest is not None and check_base:
        found = base_fingerprint(model)
        if found != manifest.base_fingerprint:
            raise AdapterMismatchError(
                f"Adapter {directory} was trained for base model {manifest.base_model!r} "
                f"(fingerprint {manifest.base_fingerprint}), but the loaded base has fingerprint {found}. "
                "Load the base it was trained for, or retrain the adapter on this base."
            )
    if manifest is not None and manifest.mark_tokens and list(manifest.mark_tokens) != [MARK_L, MARK_R]:
        raise AdapterMismatchError(
            f"Adapter {directory}'s manifest names marking tokens {manifest.mark_tokens}, not FlashBack's "
            f"{[MARK_L, MARK_R]}; it was not written by FlashBack, or was edited. Restore it from its source."
        )
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    new_tokenizer = load_pretrained(str(directory), "tokenizer") if has_tokenizer else tokenizer
    if not has_tokenizer and manifest is not None and manifest.mark_tokens:
        new_tokenizer = copy.deepcopy(tokenizer)
        new_tokenizer.add_special_tokens({"additional_special_tokens": list(manifest.mark_tokens)})
        got = new_tokenizer.convert_tokens_to_ids(list(manifest.mark_tokens))
        if manifest.mark_token_ids and list(got) != list(manifest.mark_token_ids):
            raise AdapterMismatchError(
                f"Adapter {directory} expects marking tokens {manifest.mark_tokens} at ids "
                f"{manifest.mark_token_ids}, but this tokenizer assigns {got}. It was trained with another tokenizer."
            )
    peft_config, tensors = _read_adapter(directory, manifest)
    rows = model.get_input_embeddings().weight.shape[0]
    trained_rows = _token_indices(peft_config)
    if trained_rows and max(trained_rows) >= max(rows, len(new_tokenizer)):
        raise AdapterMismatchError(
            f"Adapter {directory} trains token rows {sorted(trained_rows)[-2:]} that neither the model ({rows} rows) "
            f"nor the tokenizer ({len(new_tokenizer)} tokens) has: it needs its flashback_adapter.json (the manifest "
            "naming the marking tokens) or its saved tokenizer. Restore the folder from its source."
        )
    if len(new_tokenizer) > rows:
        model.resize_token_embeddings(len(new_tokenizer), mean_resizing=False)
    peft_model = None
    try:
        peft_config.inference_mode = True
        wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
        peft_model = wrapper(model, peft_config)
        result = set_peft_model_state_dict(peft_model, tensors)
        missing = [k for k in result.missing_keys if ("lora_" in k or "trainable_tokens" in k) and "lm_head." not in k]
        if missing:
            raise KeyError(f"the adapter lacks {missing[0]}")
        peft_model.eval()
        if manifest is not None and manifest.extra.get("activation") == ACTIVATION_PASSAGE:
            # LoRA only from the passage on: a per-token switch, so never merged
            if not activate(peft_model):
                raise AdapterMismatchError(f"Adapter {directory} is marked activated but holds no LoRA layers.")
            merge_token_rows(peft_model)
            return peft_model, new_tokenizer, manifest
    except Exception as exc:  # whatever failed, the model is left as it was: no injected layer stays behind
        if peft_model is not None:
            peft_model.base_model.unload()
        if len(new_tokenizer) > rows:
            model.resize_token_embeddings(rows)
        if isinstance(exc, AdapterMismatchError):
            raise
        raise AdapterMismatchError(
            f"Adapter {directory} does not fit this base model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}). It was probably trained for another base model."
        ) from exc
    if merge and not getattr(model, "is_quantized", False):  # merging into quantized weights rounds
        return peft_model.merge_and_unload(), new_tokenizer, manifest
    return peft_model, new_tokenizer, manifest


def _token_indices(peft_config: Any) -> set[int]:
    """Token rows a PEFT config trains (``trainable_token_indices``: a list, or a dict per layer)."""
    spec = getattr(peft_config, "trainable_token_indices", None)
    values = spec.values() if isinstance(spec, dict) else [spec] if spec else []
    return {int(i) for v in values for i in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(i, int)}


def merge_token_rows(peft_model: Any) -> None:
    """Write the trained mark rows into the embedding and LM head once. PEFT's trainable-token layer
    otherwise rebuilds the whole 49k x 576 matrix on every forward (x1.8 per token on a CPU); the
    rows are ungated and only the marks use them, so merging changes no logit."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer) and not module.merged:
            module.merge()
