"""What the benchmarks time: the default model (merged append adapter), or random weights in the
shapes of public models, and seeded random ids; checked before any process starts."""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # random weights: shapes of public models, so 1B-7B can be timed without their weights
    "llama-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
    },
    "llama-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
    },
    "opt-125m": {
        "model_type": "opt",
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768,
    },
    "opt-6.7b": {
        "model_type": "opt",
        "hidden_size": 4096,
        "ffn_dim": 16384,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 4096,
    },
}
MODES = ("prepend", "append", "isolated", "isolated-warm", "none")
SHIPPED = "shipped"
"""Model name of the shipped default as loaded by a user (isolated + activated adapter, unmerged)."""
BENCH_BACKENDS = ("torch", "llamacpp", "openai", "vllm")
"""The engine's backends; ``openai`` is timed on llama.cpp's server, ``vllm`` is the same backend on vLLM."""
WARM_POOL = 4
"""isolated-warm draws its passages from this many (a corpus repeats itself); isolated is cold (always new)."""


def plan_lengths(total: int, doc_tokens: int, prompt_tokens: int | None, gen_tokens: int | None) -> tuple[int, int]:
    """(prompt, generated) so that prompt + generated + doc = total; the paper uses a 512-token prompt."""
    if gen_tokens is not None:
        prompt = total - doc_tokens - gen_tokens
    else:
        prompt = prompt_tokens if prompt_tokens is not None else min(512, total // 4)
    gen = total - doc_tokens - prompt
    if prompt < 1 or gen < 1:
        raise ValueError(
            f"total length {total} leaves no room for prompt={prompt} and generation={gen} "
            f"with a {doc_tokens}-token doc"
        )
    return prompt, gen


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids ``t0..tN``: random-weight configs need no real vocabulary, and this
    one is built offline in milliseconds (the benchmark feeds token ids; text is only decoded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def fill_random(model, std: float = 0.02, pool: int = 1 << 20) -> None:
    """Give every weight random values from a 1M-value pool (tiled): timing does not depend on the values,
    and drawing 1B+ fresh normals takes ~15 s on a small CPU (transformers' own init is slower still)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(pool + 7919, generator=gen) * std
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat = p.view(-1)
            src = values[(i * 104729) % 7919 :][:pool].to(device=p.device, dtype=p.dtype)
            for start in range(0, flat.numel(), pool):
                n = min(pool, flat.numel() - start)
                flat[start : start + n].copy_(src[:n])


def check_options(model: str, dtype: str, device: str, modes: list[str] | None = None) -> None:
    """Fail on a bad name before any process starts or any weights load."""
    from ..loading.devices import resolve_device, resolve_dtype

    resolve_dtype(dtype)
    resolve_device(device)
    if model.startswith("config:") and model.removeprefix("config:") not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {model!r}; named configs are {', '.join(NAMED_CONFIGS)} (as config:NAME).")
    unknown = [m for m in modes or [] if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; modes are {', '.join(MODES)}.")


def parse_lengths(lengths: str) -> list[int]:
    try:
        points = [int(t) for t in lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths takes comma-separated whole numbers (e.g. 512,1024), got {lengths!r}") from None
    if any(t < 1 for t in points):
        raise ValueError(f"--lengths must be positive, got {lengths!r}")
    return points


def load_model(name: str, dtype: str, device: str, backend: str = "torch", gguf_dtype: str | None = None):
    """The timed model; llama.cpp and its server run a GGUF export in ``gguf_dtype`` (default: ``dtype``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..loading.devices import resolve_dtype
    from ..loading.shipped import shipped_adapter
    from ..model import FlashBackModel

    check_options(name, dtype, device)
    if name.startswith("config:"):
        from transformers.initialization import no_init_weights

        spec = dict(NAMED_CONFIGS[name.removeprefix("config:")])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        fill_random(model)
        return FlashBackModel(model.eval(), synthetic_tokenizer(config.vocab_size), name=name)
    if name == SHIPPED:  # what a user gets: isolated + the activated adapter, unmerged (a LoRA GGUF on llama.cpp)
        if backend == "llamacpp":
            from ..loading.backends import default_isolated_export

            return FlashBackModel.from_gguf(str(default_isolated_export(gguf_dtype or "float16")))
        return FlashBackModel.from_pretrained("default", dtype=dtype, device=device, backend="torch")
    if backend == "llamacpp":
        return FlashBackModel.from_gguf(gguf_export(name, gguf_dtype or dtype))
    if backend == "openai":  # llama.cpp's server on the same GGUF, for this process's life
        from .servers import llama_server

        folder = gguf_export(name, gguf_dtype or dtype)
        # the host-memory prompt cache off: the slot's own prefix cache is what is measured, and a cold call is cold
        url = _SERVERS.enter_context(llama_server(Path(folder) / "model.gguf", n_ctx=8192, extra=["--cache-ram", "0"]))
        return FlashBackModel.from_server(folder, url)
    if backend == "vllm":  # the openai backend on vLLM's CPU build, serving the same merged checkpoint in fp32
        from .servers import vllm_server

        folder = gguf_export(name, "float32")
        # blocks of 32 (the least its CPU attention takes): what it caches is the shared prefix in whole blocks
        server = vllm_server(folder, max_model_len=8192, kv_cache_gib=2, extra=["--block-size", "32"])
        return FlashBackModel.from_server(folder, _SERVERS.enter_context(server))
    # merged weights (the append adapter for "default", as before): every mode runs the same kernels and
    # the block carries its marks; an activated adapter's unmerged LoRA is timed apart (bench_activation)
    adapter = shipped_adapter("append") if name == "default" else None
    return FlashBackModel.from_pretrained(name, adapter=adapter or "none", dtype=dtype, device=device, backend="torch")


_SERVERS = contextlib.ExitStack()
atexit.register(_SERVERS.close)


def gguf_export(name: str, dtype: str) -> str:
    """The folder llama.cpp is timed on: ``name`` when it holds ``model.gguf``; for ``"default"`` its merged
    append adapter, exported once (in ``dtype``) under $FLASHBACK_HOME/exports."""
    from ..loading.export import export_gguf, export_hf
    from ..loading.resolve import flashback_home

    if name != "default":
        return name
    out = flashback_home() / "exports" / f"default-append-{dtype}"
    if not (out / "model.gguf").is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        export_gguf(export_hf("default", None, out, "float32"), out / "model.gguf", dtype)
    return str(out)


def random_id_source(fb: Any, seed: int) -> Callable[[int], list[int]]:
    """Seeded random input ids that skip every special id (the default model's marks are the highest ids)."""
    import torch

    vocab = min(fb.backend.vocab_size, len(fb.tokenizer))
    special = set(fb.tokenizer.all_special_ids or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)

    def random_ids(n: int) -> list[int]:
        return allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist()

    return random_ids


def finish_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
