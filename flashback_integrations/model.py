"""``FlashBackModel``: a causal LM + tokenizer (+ adapter) that generates with periodic retrieval."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .calls import default_mode as call_default_mode
from .calls import prepare_call
from .calls import resolve_config as resolve_call_config
from .chat import chat_template_ids
from .config import FlashBackConfig
from .engine.backend import Backend, TorchBackend
from .engine.layout import MarkIds, find_mark_ids, prompt_ids
from .engine.loop import GenerationSpec, run, run_rows
from .engine.passages import DEFAULT_PASSAGE_CACHE_BYTES, PassageKVCache
from .engine.pool import DEFAULT_CONTEXT_POOL_BYTES
from .errors import ConfigError
from .events import Event, GenerationResult, final_result
from .loading.adapter import AdapterManifest
from .loading.pretrained import backend_parts, load_parts, shared_model
from .retrieval import RetrieverLike


class FlashBackModel:
    """Owns the model and tokenizer; every call gets its own cache, so calls never share state: calls from
    several threads run concurrently and give the same outputs as sequential calls."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: FlashBackConfig | None = None,
        name: str | None = None,
        adapter_manifest: AdapterManifest | None = None,
        passage_cache_bytes: int = DEFAULT_PASSAGE_CACHE_BYTES,
        backend: Backend | None = None,
        generation_config: Any = None,
        context_cache_bytes: int = DEFAULT_CONTEXT_POOL_BYTES,
    ) -> None:
        """``model`` is a PyTorch causal LM (the torch backend), or None with another ``backend``.
        ``context_cache_bytes`` bounds the finished calls' caches kept for the next call (0 = none)."""
        self.passage_cache = PassageKVCache(passage_cache_bytes)
        """Isolated mode's passage keys/values, shared by every call on this model (LRU, in bytes)."""
        self.model = model.eval() if model is not None else None
        self.backend: Backend = backend or TorchBackend(self.model, context_cache_bytes)
        self.tokenizer = tokenizer
        self.config = config or FlashBackConfig()
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        self.adapter_manifest = adapter_manifest
        self.generation_config = generation_config
        self.logged: dict[str, Any] = {}
        """What was logged or warned once per model (the resolved mode, untrained append)."""

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "default",
        adapter: str | Path | bool | None = None,
        config: FlashBackConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        merge_adapter: bool = True,
        check_adapter_base: bool = True,
        passage_cache_bytes: int = DEFAULT_PASSAGE_CACHE_BYTES,
        context_cache_bytes: int = DEFAULT_CONTEXT_POOL_BYTES,
        revision: str | None = None,
        trust_remote_code: bool = False,
        backend: str = "auto",
        gguf: str | Path | None = None,
        server_url: str | None = None,
        served_model: str | None = None,
        **model_kwargs: Any,
    ) -> FlashBackModel:
        """Load ``"default"`` (SmolLM2-135M-Instruct, offline when possible), a hub id or a local path.

        ``adapter`` is a FlashBack/PEFT adapter directory; its marking tokens and settings are restored,
        and it is refused when it was trained for another base model. ``"default"`` comes with the
        FlashBack adapter shipped in the package unless ``adapter="none"`` (or ``False``) or
        ``config.marks is False``. With no ``device`` the GPU is used when there is one (bf16), else the
        CPU (fp32); ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``device_map``,
        ``quantization_config``, ``attn_implementation``, ...). Remote code runs only with
        ``trust_remote_code=True``. ``backend="llamacpp"`` runs a GGUF instead (:meth:`from_gguf`),
        ``backend="openai"`` a completions server at ``server_url`` (:meth:`from_server`).
        """
        where = {"gguf": gguf, "server_url": server_url, "served_model": served_model}
        parts = load_parts(name_or_path, adapter, config, dtype, device, merge_adapter, check_adapter_base,
                                      revision, trust_remote_code, backend, where, model_kwargs)  # fmt: skip
        return cls(**parts, passage_cache_bytes=passage_cache_bytes, context_cache_bytes=context_cache_bytes)

    @classmethod
    def from_gguf(
        cls,
        name_or_path: str = "default",
        gguf: str | Path | None = None,
        config: FlashBackConfig | None = None,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        passage_room: int = 1024,
    ) -> FlashBackModel:
        """llama.cpp: ``"default"`` (its GGUF, no adapter) or a ``flashback export`` folder; every mode, no
        ``generate_batch``. ``kv_type``: f16, f32 or q8_0; ``passage_room``: most passage tokens per retrieval."""
        from .loading.backends import load_llamacpp

        loaded = load_llamacpp(name_or_path, gguf, n_threads, n_ctx, kv_type=kv_type, passage_room=passage_room)
        return cls(**backend_parts(loaded, config))

    @classmethod
    def from_server(
        cls,
        name_or_path: str = "default",
        server_url: str = "http://127.0.0.1:8080",
        served_model: str | None = None,
        config: FlashBackConfig | None = None,
        api_key: str | None = None,
    ) -> FlashBackModel:
        """The server backend: an OpenAI-compatible completions server (llama.cpp's ``llama-server``, vLLM,
        SGLang) serving ``name_or_path`` (``"default"``'s base model, or a ``flashback export`` folder whose
        checkpoint or GGUF the server loaded). One streamed request per stride; the server's prefix cache
        keeps the text before the block. Modes none, prepend, append; the server samples."""
        from .loading.backends import load_server

        return cls(**backend_parts(load_server(name_or_path, server_url, served_model, api_key), config))

    @classmethod
    def shared(
        cls,
        name_or_path: str = "default",
        adapter: str | Path | bool | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        mode: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        backend: str = "auto",
        **model_kwargs: Any,
    ) -> FlashBackModel:
        """One instance per (model, adapter, loading arguments) in this process: framework objects built
        many times over the same model (LangChain, LlamaIndex) load the weights once. ``mode`` picks
        the shipped adapter of ``"default"`` for that layout."""
        return shared_model(cls.from_pretrained, name_or_path, adapter, dtype, device, mode, revision,
                                 trust_remote_code, backend, model_kwargs)  # fmt: skip

    # ----------------------------------------------------------------- properties
    @property
    def mark_ids(self) -> MarkIds | None:
        """The marking token ids when the tokenizer has both marks and the model has rows for them."""
        return find_mark_ids(self.tokenizer, self.backend.vocab_size)

    @property
    def context_window(self) -> int | None:
        return self.backend.context_window

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None) or self.generation_config
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    # ----------------------------------------------------------------- generation
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt ids as the model sees them (the tokenizer's own special-token policy; text never
        yields the marking tokens, which only bound retrieved passages)."""
        return prompt_ids(self.tokenizer, prompt, self.backend.vocab_size, self.mark_ids)

    def chat_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for a conversation through the tokenizer's chat template, ready for the answer.

        Messages are ``{"role", "content"}`` dicts; an assistant message may carry OpenAI-format
        ``tool_calls`` and a ``tool`` message a ``tool_call_id``. ``tools`` (OpenAI format) go through the
        template's own tool support, or a system message when it has none (:mod:`.tools`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{self.name!r} has no chat template; pass plain text prompts instead.")
        return chat_template_ids(self.tokenizer, messages, tools)

    def default_mode(self) -> tuple[str, str]:
        """The layout a call gets when it names none, and why (:func:`.calls.default_mode`)."""
        return call_default_mode(self)

    def resolve_config(self, config: FlashBackConfig | None = None, **overrides: Any) -> FlashBackConfig:
        """The settings of one call; ``mode=None`` means this model's own layout (:meth:`default_mode`)."""
        return resolve_call_config(self, config, **overrides)

    def prepare(
        self, prompt: str | Sequence[int], retriever: RetrieverLike | None = None, **kwargs: Any
    ) -> GenerationSpec:
        """Validate everything and fail before any model work (the arguments: :func:`.calls.prepare_call`)."""
        return prepare_call(self, prompt, retriever, **kwargs)

    def stream(
        self, prompt: str | Sequence[int], retriever: RetrieverLike | None = None, **kwargs: Any
    ) -> Iterator[Event]:
        """Yield ``TokenEvent``s and ``RetrievalEvent``s as they happen, then one ``FinishEvent``.

        Takes the same keyword arguments as :meth:`generate`. Validation happens here, before the
        first event, so a bad call raises at once.
        """
        spec = self.prepare(prompt, retriever, **kwargs)
        return run(self.backend, self.tokenizer, spec)

    def generate(
        self, prompt: str | Sequence[int], retriever: RetrieverLike | None = None, **kwargs: Any
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` with a retrieval every ``config.stride`` tokens.

        Takes :func:`.calls.prepare_call`'s keyword arguments (declared there once): ``config``, ``max_new_tokens``,
        sampling (``temperature > 0`` with ``top_k``/``top_p``/``min_p``/``seed``; ``repetition_penalty``
        applies to greedy decoding too), ``stop``, ``ignore_eos``, ``callbacks``, ``first_query``, a
        ``grammar`` (:class:`~.engine.constrained.Grammar`: JSON schema, JSON object, Lark, regex) and
        ``logprobs``/``top_logprobs`` (``GenerationResult.logprobs``). Passages per retrieval are
        ``config.num_passages``."""
        return final_result(self.stream(prompt, retriever, **kwargs))

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        retriever: RetrieverLike | None = None,
        *,
        config: FlashBackConfig | None = None,
        max_new_tokens: int = 64,
    ) -> list[GenerationResult]:
        """Greedy generation of several prompts in one batch (a batched forward per step).

        Each row retrieves for itself and gets the tokens ``generate`` would give it. The rows must
        keep equal context lengths: prompts of equal token length and passages of equal token length
        (the runtime benchmark's setting). EOS and stop strings are not applied.
        """
        if not prompts:
            raise ConfigError("generate_batch needs at least one prompt.")
        if self.model is None:
            raise ConfigError(f"generate_batch runs batched forwards on the torch backend, not {self.backend.name}.")
        specs = [self.prepare(p, retriever, config=config, max_new_tokens=max_new_tokens) for p in prompts]
        lengths = {len(s.prompt_ids) for s in specs}
        if len(lengths) > 1:
            raise ConfigError(
                f"generate_batch needs prompts of equal token length, got {sorted(lengths)}; "
                "use generate() per prompt for prompts of different lengths."
            )
        return run_rows(self.model, self.tokenizer, specs)
