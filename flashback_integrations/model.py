"""``FlashBackModel``: a causal LM + tokenizer (+ adapter) that generates with periodic retrieval."""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .chat import chat_template_ids, text_with_passages
from .config import FlashBackConfig
from .engine.backend import Backend, TorchBackend, check_backend
from .engine.constrained import Constraint, Grammar
from .engine.layout import MARK_L, MARK_R, MarkIds, block_budget, find_mark_ids, prompt_ids
from .engine.loop import GenerationSpec, run, run_rows
from .engine.passages import DEFAULT_PASSAGE_CACHE_BYTES, PassageKVCache
from .engine.pool import DEFAULT_CONTEXT_POOL_BYTES
from .engine.sampling import Sampling, validate_logprobs, validate_sampling
from .errors import ConfigError, ContextWindowError, MarksUnavailableError
from .events import Event, FlashBackCallback, GenerationResult, check_call_arguments, final_result
from .loading.adapter import AdapterManifest, load_adapter
from .loading.devices import auto_placement, check_model_kwargs, check_trust_remote_code
from .loading.resolve import exported_config, load_pretrained, resolve_model
from .loading.shipped import choose_adapter, safe_mode, untrained_append_warning
from .retrieval import RetrieverLike, as_retrieve_fn

logger = logging.getLogger("flashback_integrations")


def with_saved(config: FlashBackConfig | None, saved: FlashBackConfig | None) -> FlashBackConfig | None:
    """A call's settings over what an adapter or export recorded: its layout and tail unless chosen."""
    if config is None or saved is None:
        return config or saved
    if config.mode is None:
        config = config.replace(mode=saved.mode)
    return config if config.tail_tokens is not None else config.replace(tail_tokens=saved.tail_tokens)


MAX_SHARED_MODELS = 4
"""Models ``FlashBackModel.shared`` keeps loaded (least recently used out first); a caller holding one keeps it."""
_SHARED: OrderedDict[tuple[Any, ...], FlashBackModel] = OrderedDict()
_SHARED_LOCK = threading.Lock()


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
        check_trust_remote_code(trust_remote_code)
        model_kwargs = check_model_kwargs(model_kwargs)
        if backend == "auto":
            from .loading.backends import AUTO_REASONS, auto_backend

            mode = config.mode if config is not None else None
            if name_or_path == "default" and adapter is None:  # the shipped adapter the config asks for, or none
                adapter = choose_adapter(name_or_path, None, config) or "none"
            backend = auto_backend(name_or_path, adapter, dtype, device, model_kwargs, mode)
            logger.info("%s: backend=%s (auto: %s)", name_or_path, backend, AUTO_REASONS[backend])
        if backend != "torch":
            from .loading.backends import load_backend

            if model_kwargs or trust_remote_code:
                raise ConfigError(
                    f"model_kwargs and trust_remote_code are torch from_pretrained arguments; backend={backend!r} "
                    "loads no transformers model. Drop them."
                )
            where = {"gguf": gguf, "server_url": server_url, "served_model": served_model}
            mode = config.mode if config is not None else None
            return cls._with_saved(load_backend(name_or_path, adapter, backend, **where, mode=mode), config)
        dtype, device = auto_placement(dtype, device, model_kwargs.get("device_map"))
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise ConfigError(f"revision must be a branch, tag or commit name, got {revision!r}.")
        adapter = choose_adapter(name_or_path, adapter, config)

        source = resolve_model(name_or_path)
        hub = {"revision": revision} if revision is not None else {}
        tokenizer = load_pretrained(source, "tokenizer", trust_remote_code=trust_remote_code, **hub)
        model = load_pretrained(
            source, "model", trust_remote_code=trust_remote_code, dtype=dtype, **hub, **model_kwargs
        )
        if device is not None and model_kwargs.get("device_map") is None and not getattr(model, "is_quantized", False):
            model.to(device)
        manifest = None
        if adapter is not None:
            model, tokenizer, manifest = load_adapter(
                model, tokenizer, adapter, merge=merge_adapter, check_base=check_adapter_base
            )
        # the adapter's settings, or those a `flashback export` folder records (its adapter merged)
        saved = manifest.flashback_config if manifest is not None else exported_config(source)
        return cls(
            model,
            tokenizer,
            config=with_saved(config, FlashBackConfig.from_dict(saved) if saved else None),
            name=name_or_path,
            adapter_manifest=manifest,
            passage_cache_bytes=passage_cache_bytes,
            context_cache_bytes=context_cache_bytes,
        )

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
        return cls._with_saved(loaded, config)

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

        return cls._with_saved(load_server(name_or_path, server_url, served_model, api_key), config)

    @classmethod
    def _with_saved(cls, loaded: dict[str, Any], config: FlashBackConfig | None) -> FlashBackModel:
        return cls(None, config=with_saved(config, loaded.pop("config")), **loaded)

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
        check_trust_remote_code(trust_remote_code)
        model_kwargs = check_model_kwargs(model_kwargs)
        dtype, placed = auto_placement(dtype, device, model_kwargs.get("device_map"))
        chosen = choose_adapter(name_or_path, adapter, FlashBackConfig(mode=mode) if mode else None)
        loading = (str(dtype), str(placed), revision, bool(trust_remote_code), backend)
        key = (name_or_path, str(chosen) if chosen else None, *loading, repr(sorted(model_kwargs.items())))
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls.from_pretrained(
                    name_or_path,
                    adapter=chosen or "none",
                    dtype=dtype,
                    device=placed,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                    backend=backend,
                    **model_kwargs,
                )
            _SHARED.move_to_end(key)
            while len(_SHARED) > MAX_SHARED_MODELS:
                _SHARED.popitem(last=False)
            return _SHARED[key]

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
        """The layout a call gets when it names none, and why: the adapter's (or the export's), else
        :func:`safe_mode` (untrained append reads passages poorly: it runs only when asked for)."""
        if self.config.mode is not None:
            source = "its adapter's layout" if self.adapter_manifest is not None else "the model's saved layout"
            return self.config.mode, source
        return safe_mode(self.backend.places_positions)

    def resolve_config(self, config: FlashBackConfig | None = None, **overrides: Any) -> FlashBackConfig:
        """The settings of one call; ``mode=None`` means this model's own layout (:meth:`default_mode`)."""
        config = config or self.config
        if overrides:
            config = config.replace(**overrides)
        if config.mode is None:
            mode, why = self.default_mode()
            if getattr(self, "_mode_logged", None) != mode:  # once per model and mode
                self._mode_logged = mode
                logger.info("%s: mode=%s (%s)", self.name, mode, why)
            config = config.replace(mode=mode)
        if config.tail_tokens is None:
            config = config.replace(tail_tokens=self.config.tail_tokens or 1)
        return config

    def _warn_untrained_append(self, config: FlashBackConfig) -> None:
        untrained = config.mode == "append" and self.adapter_manifest is None and self.mark_ids is None
        if untrained and not getattr(self, "_append_warned", False):
            self._append_warned = True
            warnings.warn(untrained_append_warning(self.name), UserWarning, stacklevel=4)

    def _marks_for(self, config: FlashBackConfig) -> MarkIds | None:
        marks = self.mark_ids
        if config.marks is True and marks is None:
            raise MarksUnavailableError(
                f"marks=True but {self.name!r} has no {MARK_L}/{MARK_R} tokens. Load a FlashBack adapter "
                "(FlashBackModel.from_pretrained(base, adapter=DIR)) or a model saved with the marks, "
                "or set marks=False."
            )
        return marks if config.marks is not False else None

    def prepare(
        self,
        prompt: str | Sequence[int],
        retriever: RetrieverLike | None = None,
        config: FlashBackConfig | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        callbacks: Sequence[FlashBackCallback] | None = None,
        output_logits: bool = False,
        first_query: str | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        grammar: Grammar | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> GenerationSpec:
        """Validate everything and fail before any model work."""
        named = (config or self.config).mode
        config = self.resolve_config(config)
        reason = None if named is not None else self.default_mode()[1]
        self._warn_untrained_append(config)
        check_call_arguments(ignore_eos, output_logits, callbacks, first_query)
        stop = validate_sampling(temperature, top_p, max_new_tokens, seed, stop, top_k, min_p, repetition_penalty)
        top = validate_logprobs(logprobs, top_logprobs)
        if grammar is not None:
            if not isinstance(grammar, Grammar):
                raise ConfigError(
                    f"grammar must be a Grammar (Grammar.json_schema(...), .json_object(), .lark(...), .regex(...)), "
                    f"got {type(grammar).__name__}."
                )
            if ignore_eos:
                raise ConfigError("a grammar ends the output with EOS; it cannot be combined with ignore_eos=True.")
            Constraint(grammar, self.tokenizer, self.backend.vocab_size, self.eos_ids)
        if config.retrieves and retriever is None:
            raise ConfigError(
                f"mode={config.mode!r} needs a retriever (an object with retrieve(query, k) or a "
                "callable (query, k) -> list[str]); pass one, or use mode='none'."
            )
        check_backend(self.backend, config, self.name, grammar is not None, output_logits, top is not None)
        marks = self._marks_for(config)
        prompt, question = text_with_passages(self.tokenizer, prompt, retriever, config, first_query)
        prompt_ids = self.encode(prompt)
        window = self.context_window
        block = block_budget(config.num_passages, config.max_doc_tokens, marks is not None) if config.retrieves else 0
        needed = len(prompt_ids) + max_new_tokens - 1 + block
        if window is not None and needed > window:
            raise ContextWindowError(
                f"Prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) + retrieval block "
                f"(up to {block} tokens: num_passages={config.num_passages} x max_doc_tokens={config.max_doc_tokens}"
                f"{' + 2 marks' if marks else ''}) needs a context of {needed} tokens, but {self.name!r} "
                f"has {window}. Shorten the prompt, lower max_new_tokens, num_passages or max_doc_tokens."
            )
        return GenerationSpec(
            prompt_ids=prompt_ids,
            config=config,
            marks=marks,
            max_new_tokens=max_new_tokens,
            retrieve=as_retrieve_fn(retriever) if (config.retrieves and retriever is not None) else None,
            sampling=Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed),
            stop=list(stop or []),
            eos_ids=set() if ignore_eos else self.eos_ids,
            callbacks=list(callbacks or []),
            output_logits=output_logits,
            first_query=first_query,
            passage_cache=self.passage_cache if config.mode == "isolated" else None,
            fingerprint=self.backend.fingerprint() if config.mode == "isolated" else None,
            grammar=grammar,
            top_logprobs=top,
            mode_reason=reason,
            question=question,
        )

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

        Takes :meth:`prepare`'s keyword arguments (declared there once): ``config``, ``max_new_tokens``,
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
