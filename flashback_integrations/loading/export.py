"""``flashback export``: an adapter merged into its base as a plain checkpoint that other engines load.

A Hugging Face folder (transformers, vLLM, SGLang: no PEFT, no trainable-token layers) and, for
Llama-family models, a GGUF file (llama.cpp, Ollama). Both carry the two marking tokens in the
vocabulary, so a server can be given the layout's token ids as they are.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..engine.activation import ACTIVATION_PASSAGE
from ..engine.layout import MARK_L, MARK_R, find_mark_ids
from ..errors import ConfigError, disk_full, is_disk_full
from .adapter import AdapterManifest, check_adapter_dir, load_adapter
from .resolve import EXPORT_MANIFEST, load_pretrained, resolve_model
from .shipped import shipped_adapter

GGUF_ARCHS = ("llama",)
"""Architectures whose GGUF tensors and metadata this writer knows (SmolLM2 is one)."""
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


def _fresh_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; choose a new output folder.")


def export_hf(model: str = "default", adapter: str | Path | bool | None = None, out: str | Path = "export",
              dtype: str = "float32") -> Path:  # fmt: skip
    """Write base + ``adapter`` merged into ``out`` (``"default"`` without an adapter: its shipped append
    adapter; ``"none"``: the base alone). An activated adapter cannot be merged: its LoRA is on only from
    the passage on."""
    import torch

    out = Path(out)
    _fresh_folder(out)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    if adapter is False or (isinstance(adapter, str) and adapter.lower() == "none"):
        adapter = None  # the base alone (e.g. a GGUF of a model without marks)
    elif adapter is None and model == "default":
        adapter = shipped_adapter("append")
    manifest = None
    if adapter is not None:
        manifest = AdapterManifest.load(check_adapter_dir(adapter))
        if manifest is not None and manifest.extra.get("activation") == ACTIVATION_PASSAGE:
            raise ConfigError(
                f"{adapter} is an activated adapter (LoRA on from the passage on, for mode='isolated'): merged "
                "weights would apply it to every token. Export an append or prepend adapter, or keep the torch "
                "backend for the isolated layout."
            )
    source = resolve_model(model)
    tokenizer = load_pretrained(source, "tokenizer")
    base = load_pretrained(source, "model", dtype="float32")
    merged = base
    if adapter is not None:
        merged, tokenizer, manifest = load_adapter(base, tokenizer, adapter, merge=True)
    marks = find_mark_ids(tokenizer, merged.get_input_embeddings().weight.shape[0])
    _zero_untied_mark_rows(merged, marks)
    merged = merged.to(getattr(torch, dtype))
    with _staged(out) as stage:
        merged.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        _write_record(stage, _record(model, adapter, manifest, marks, dtype))
    return out


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends without error: a kill or a
    full disk never leaves a half-written export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        yield stage
        if out.exists():
            out.rmdir()
        stage.replace(out)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full(out.parent, f"exporting to {out}") from exc
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _record(model: str, adapter: Any, manifest: Any, marks: Any, dtype: str, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": model,
        "adapter": str(adapter) if adapter is not None else None,
        "flashback_config": manifest.flashback_config if manifest is not None else {},
        "mark_tokens": [MARK_L, MARK_R] if marks is not None else [],
        # marks bound passages and are never generated: an engine serving this checkpoint must ban them
        # (logit_bias -100 in an OpenAI-style request), as the torch engine masks them
        "never_generate": [marks.left, marks.right] if marks is not None else [],
        "dtype": dtype,
        **extra,
    }


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2))


def _zero_untied_mark_rows(model: Any, marks: Any) -> None:
    """An untied head got random rows for the marks at resize: make them plain zeros (marks are never
    generated; engines ban them)."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if marks is not None and head is not None and head.weight.data_ptr() != embed.weight.data_ptr():
        with torch.no_grad():
            head.weight[[marks.left, marks.right]] = 0


def _permute(weights: Any, heads: int) -> Any:
    """Hugging Face's rotary layout -> llama.cpp's (its converter's ``permute``; transformers' GGUF
    loader reverses exactly this)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tokenizer_fields(tokenizer: Any, rows: int) -> dict[str, Any]:
    """Byte-level BPE vocabulary, merges and token types in GGUF's ``gpt2`` tokenizer model."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers; this one is {bpe.get('type')!r}.")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [_TOKEN_USER_DEFINED] * rows
    for token, i in {**bpe["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}.items():
        if i < rows:
            tokens[i], types[i] = token, _TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < rows:
            types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


GGUF_DTYPES = ("float16", "float32", "q8_0", "q4_1", "q4_0")
_GGUF_FILE_TYPES = {"float16": "MOSTLY_F16", "float32": "ALL_F32", "q8_0": "MOSTLY_Q8_0", "q4_1": "MOSTLY_Q4_1",
                    "q4_0": "MOSTLY_Q4_0"}  # fmt: skip


def _gguf_quant(dtype: str, target: str) -> Any:
    """The block type of one 2-D tensor, or None for a float one. As llama.cpp's own quantizer does for
    the 4-bit types, the (tied) token embedding stays 8-bit: it is also the output layer."""
    import gguf

    if not dtype.startswith("q"):
        return None
    if dtype != "q8_0" and target in ("token_embd.weight", "output.weight"):
        return gguf.GGMLQuantizationType.Q8_0
    return getattr(gguf.GGMLQuantizationType, dtype.upper())


def export_gguf(
    hf_dir: str | Path, out_file: str | Path, dtype: str = "float16", pre_tokenizer: str = "smollm"
) -> Path:
    """Write the exported Hugging Face folder ``hf_dir`` as one GGUF file (norms in fp32, the rest in
    ``dtype``: float32, float16, or llama.cpp's blocks of 32 weights quantised by the ``gguf`` package: q8_0,
    q4_1, q4_0; the 4-bit files keep the token embedding in q8_0, as llama.cpp's quantizer does).
    ``pre_tokenizer`` names llama.cpp's pre-tokenizer (SmolLM2's is ``smollm``)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    if config.model_type not in GGUF_ARCHS:
        raise ConfigError(
            f"GGUF export knows the {', '.join(GGUF_ARCHS)} architecture(s), not {config.model_type!r}; export the "
            "Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}.")
    tokenizer = load_pretrained(str(hf_dir), "tokenizer")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(file))
    rows = state["model.embed_tokens.weight"].shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(hf_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    writer.add_file_type(getattr(gguf.LlamaFileType, _GGUF_FILE_TYPES[dtype]))
    fields = _tokenizer_fields(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name!r}.")
        data = tensor.float()
        if name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        array = data.numpy().astype(np.float32)
        quant = _gguf_quant(dtype, target) if data.dim() == 2 else None
        if quant is not None and data.shape[1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
            writer.add_tensor(target, gguf.quants.quantize(array, quant), raw_dtype=quant)
        elif dtype == "float32" or data.dim() == 1:
            writer.add_tensor(target, array)
        else:
            writer.add_tensor(target, array.astype(np.float16))
    _finish_gguf(writer, tmp, out_file)
    return out_file


LORA_GGUF = "adapter.gguf"
"""The LoRA GGUF of an activated adapter, beside ``model.gguf`` (llama.cpp switches it on from the passage on)."""


def export_activated_gguf(
    model: str = "default",
    adapter: str | Path | None = None,
    out: str | Path = "export-isolated",
    dtype: str = "float16",
) -> Path:
    """An activated adapter for llama.cpp: ``out/model.gguf`` is the base with the adapter's mark rows (only the
    marks use them, so they are exact merged) and ``out/adapter.gguf`` its LoRA, which the llama.cpp backend
    turns on for the passage segments and the tail that reads them, as the torch backend's gate does. ``"default"``
    without an adapter exports its shipped isolated adapter. The LoRA stays in float32 (a few MB)."""
    import torch

    out = Path(out)
    _fresh_folder(out)
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}.")
    if adapter is None:
        if model != "default":
            raise ConfigError("export_activated_gguf needs adapter=DIR (an activated adapter) for a model of yours.")
        adapter = shipped_adapter("isolated")
    manifest = AdapterManifest.load(check_adapter_dir(adapter))
    if manifest is None or manifest.extra.get("activation") != ACTIVATION_PASSAGE:
        raise ConfigError(
            f"{adapter} is not an activated adapter (trained with --layout isolated, LoRA on from the passage on); "
            "export a merged adapter with `flashback export OUT --adapter A --gguf` instead."
        )
    source = resolve_model(model)
    tokenizer = load_pretrained(source, "tokenizer")
    base = load_pretrained(source, "model", dtype="float32")
    peft_model, tokenizer, manifest = load_adapter(base, tokenizer, adapter, merge=False)
    loras = _lora_weights(peft_model)
    plain = peft_model.base_model.unload()  # the base layers, with the mark rows merged at load
    marks = find_mark_ids(tokenizer, plain.get_input_embeddings().weight.shape[0])
    _zero_untied_mark_rows(plain, marks)
    with _staged(out) as stage:
        hf = Path(tempfile.mkdtemp(prefix=".hf-", dir=stage))
        with torch.no_grad():
            plain.save_pretrained(hf, safe_serialization=True)
        tokenizer.save_pretrained(hf)
        export_gguf(hf, stage / "model.gguf", dtype=dtype)
        shutil.rmtree(hf)
        _write_lora_gguf(loras, plain.config, stage / LORA_GGUF)
        tokenizer.save_pretrained(stage)
        if plain.generation_config is not None:
            plain.generation_config.save_pretrained(stage)
        extra = {"activation": ACTIVATION_PASSAGE, "lora_gguf": LORA_GGUF}
        _write_record(stage, _record(model, adapter, manifest, marks, dtype, **extra))
    return out


def _lora_weights(peft_model: Any) -> dict[str, tuple[Any, Any]]:
    """``{hf weight name: (A [r, in], B * scaling [out, r])}`` of every LoRA linear layer (one adapter)."""
    found: dict[str, tuple[Any, Any]] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not (hasattr(lora_a, "keys") and hasattr(lora_b, "keys")) or not list(lora_a.keys()):
            continue
        (key,) = list(lora_a.keys())
        weight_a = lora_a[key].weight.detach().float().cpu()
        weight_b = lora_b[key].weight.detach().float().cpu() * float(module.scaling[key])
        found[name.removeprefix(prefix) + ".weight"] = (weight_a, weight_b)
    if not found:
        raise ConfigError("the adapter holds no LoRA layers to export.")
    return found


def _write_lora_gguf(loras: dict[str, tuple[Any, Any]], config: Any, out_file: Path) -> None:
    """llama.cpp's LoRA GGUF: ``<tensor>.lora_a`` [r, in] and ``.lora_b`` [out, r] per adapted weight, with the
    scaling folded into B (alpha 0: llama.cpp then scales by 1). B's rows follow the base weight's rotary
    permutation for q and k."""
    import gguf
    import numpy as np

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)
    for name, (weight_a, weight_b) in loras.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"LoRA GGUF export: no llama.cpp name for {name!r}.")
        if name.endswith("q_proj.weight"):
            weight_b = _permute(weight_b, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight_b = _permute(weight_b, config.num_key_value_heads)
        writer.add_tensor(f"{target}.lora_a", weight_a.numpy().astype(np.float32))
        writer.add_tensor(f"{target}.lora_b", weight_b.numpy().astype(np.float32))
    _finish_gguf(writer, tmp, out_file)


def _finish_gguf(writer: Any, tmp: Path, out_file: Path) -> None:
    """Write the file beside its place and rename it in: never a half-written GGUF, a full disk said as such."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(out_file.parent, f"writing {out_file.name}") from exc
        raise
