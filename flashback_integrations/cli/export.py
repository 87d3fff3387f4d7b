"""``flashback export``: an adapter merged into its base, for engines that load plain checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, console
from .options import Model


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="Output folder (new or empty).")],
    model: Model = "default",
    adapter: Annotated[
        str | None,
        typer.Option(help="Adapter to merge (for 'default': its shipped append adapter; 'none': the base alone)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16: dtype of the saved weights.")] = "float32",
    gguf: Annotated[
        bool, typer.Option("--gguf/--no-gguf", help="Also write OUT/model.gguf for llama.cpp (Llama family).")
    ] = False,
    gguf_dtype: Annotated[
        str,
        typer.Option(help="float16 | float32 | q8_0 | q4_1 | q4_0: GGUF tensors (norms fp32; 4-bit: embedding q8_0)."),
    ] = "float16",
) -> None:
    """Write base + adapter merged, with the marking tokens in the vocabulary: a Hugging Face folder (vLLM,
    SGLang, transformers) and optionally a GGUF file (llama.cpp). An activated adapter (isolated, LoRA on from
    the passage on) cannot be merged: it is written as OUT/model.gguf (the base with its mark rows) and
    OUT/adapter.gguf (its LoRA) for the llama.cpp backend."""
    from ..loading.adapter import AdapterManifest
    from ..loading.export import export_activated_gguf, export_gguf, export_hf

    manifest = AdapterManifest.load(adapter) if adapter is not None and Path(adapter).is_dir() else None
    if manifest is not None and manifest.extra.get("activation") == "passage":
        folder = export_activated_gguf(model, adapter, out, gguf_dtype)
        console.print(f"wrote {folder}: model.gguf (base + marks) and adapter.gguf (LoRA, on from the passage on)")
        return
    folder = export_hf(model, adapter, out, dtype)
    console.print(f"wrote {folder} (Hugging Face checkpoint, marks in the vocabulary)")
    if gguf:
        console.print(f"wrote {export_gguf(folder, folder / 'model.gguf', gguf_dtype)}")
