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
    SGLang, transformers) and optionally a GGUF file (llama.cpp)."""
    from ..loading.export import export_gguf, export_hf

    folder = export_hf(model, adapter, out, dtype)
    console.print(f"wrote {folder} (Hugging Face checkpoint, marks in the vocabulary)")
    if gguf:
        console.print(f"wrote {export_gguf(folder, folder / 'model.gguf', gguf_dtype)}")
