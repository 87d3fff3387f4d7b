"""Settings shared by the LangChain and LlamaIndex classes (pydantic fields, no framework imports)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import FlashBackConfig
from .engine.layout import block_budget
from .engine.sampling import validate_logprobs, validate_sampling
from .errors import ConfigError
from .loading.devices import auto_placement, check_model_kwargs
from .loading.shipped import default_mode_for
from .model import FlashBackModel


class FlashBackSettings(BaseModel):
    """Fields of every framework class; names follow the engine's ``FlashBackConfig``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    model: str = "default"
    """``"default"`` (SmolLM2-135M-Instruct, offline), a hub id or a local path."""
    adapter: str | None = None
    """FlashBack adapter directory (LoRA + marking tokens)."""
    retriever: Any = None
    """A LangChain or LlamaIndex retriever, a ``ChromaRetriever``, or anything with ``retrieve(query, k)``."""
    mode: str | None = None
    """None: the layout the model's adapter was trained for (``"default"``: isolated), else append."""
    stride: int = 16
    query_tokens: int = 32
    num_passages: int = 1
    """Passages per retrieval (the ``k`` given to the retriever)."""
    max_doc_tokens: int = 128
    marks: bool | None = None
    on_retrieval_error: str = "raise"
    retrieval_timeout: float | None = None
    tail_tokens: int | None = None
    """isolated: history tokens that read the passages; None: what the model's adapter was trained with."""
    passage_sink: bool = False
    block_offset: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    """Sampling's top-k (as in HuggingFacePipeline, ChatOllama, vLLM), never the number of passages."""
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    """Report each generated token's log-probability (OpenAI format)."""
    top_logprobs: int | None = None
    """With ``logprobs``: also the n most likely tokens at each step (0-20)."""
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    stop: list[str] | None = None
    dtype: str | None = None
    """float32 | bfloat16 | float16; None: bf16 on a GPU, fp32 on the CPU."""
    device: str | None = None
    """cpu | cuda | cuda:N; None: the GPU when there is one, else the CPU."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``from_pretrained`` arguments: ``device_map``, ``quantization_config``, ``attn_implementation``."""
    revision: str | None = None
    """Hub branch, tag or commit of ``model``."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for repositories you trust)."""
    flashback_model: FlashBackModel | None = Field(default=None, exclude=True)
    """An already loaded model; takes precedence over ``model``/``adapter``."""
    # Accepted so the class drops into code written for hosted models; a local model has no use for them.
    timeout: float | None = None
    max_retries: int | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _flashback_check_settings(self) -> FlashBackSettings:
        """Validate the FlashBack settings at construction, not at the first call (a validator rather
        than ``model_post_init``, which the frameworks' base classes use themselves)."""
        config = self.flashback_config()
        validate_logprobs(self.logprobs, self.top_logprobs)
        validate_sampling(
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            self.seed,
            self.stop,
            self.top_k,
            self.min_p,
            self.repetition_penalty,
        )
        auto_placement(self.dtype, self.device, check_model_kwargs(self.model_kwargs).get("device_map"))
        window = self._window()
        if window is not None and config.retrieves:
            block = block_budget(config.num_passages, config.max_doc_tokens, config.marks is not False)
            if block + self.max_new_tokens >= window:
                raise ConfigError(
                    f"num_passages={config.num_passages} x max_doc_tokens={config.max_doc_tokens} "
                    f"(a block of up to {block} tokens) "
                    f"+ max_tokens={self.max_new_tokens} leave no room for a prompt in {self.model_label()!r}'s "
                    f"{window}-token context; lower num_passages, max_doc_tokens or max_tokens."
                )
        return self

    def _window(self) -> int | None:
        """The model's context length, from a loaded model or its config file (no weights loaded)."""
        if self.flashback_model is not None:
            return self.flashback_model.context_window
        try:
            from transformers import AutoConfig

            from .loading.resolve import resolve_model

            hub = {"revision": self.revision} if self.revision else {}
            cfg = AutoConfig.from_pretrained(resolve_model(self.model), trust_remote_code=False, **hub)
        except Exception:  # noqa: BLE001 - unreachable here; the call itself checks the window again
            return None
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if self.flashback_model is not None:
            return self.flashback_model.config.mode
        return default_mode_for(self.model, self.adapter)

    def flashback_config(self) -> FlashBackConfig:
        return FlashBackConfig(
            mode=self.resolved_mode(),  # type: ignore[arg-type]
            stride=self.stride,
            query_tokens=self.query_tokens,
            num_passages=self.num_passages,
            max_doc_tokens=self.max_doc_tokens,
            marks=self.marks,
            on_retrieval_error=self.on_retrieval_error,  # type: ignore[arg-type]
            retrieval_timeout=self.retrieval_timeout,
            tail_tokens=self.tail_tokens,
            passage_sink=self.passage_sink,
            block_offset=self.block_offset,
        )

    def flashback(self) -> FlashBackModel:
        """The engine model, loaded on first use and shared by every instance with the same weights."""
        if self.flashback_model is not None:
            return self.flashback_model
        # no private attribute here: pydantic would install its own model_post_init on this mixin and
        # shadow the framework base classes' one; the shared registry is the cache
        return FlashBackModel.shared(self.model, self.adapter, mode=self.resolved_mode(), **self._load_kwargs())

    def _load_kwargs(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "device": self.device,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            **self.model_kwargs,
        }

    def flashback_for_call(self, kwargs: dict[str, Any]) -> tuple[FlashBackModel, str]:
        """The model for one call: ``invoke(..., model="other")`` overrides the configured one."""
        override = kwargs.pop("model", None)
        if override is None or override == self.model:
            return self.flashback(), self.model_label()
        mode = self.mode or default_mode_for(override, self.adapter)
        return FlashBackModel.shared(override, self.adapter, mode=mode, **self._load_kwargs()), override

    def model_label(self) -> str:
        return self.flashback_model.name if self.flashback_model is not None else self.model

    def generation_kwargs(self, stop: Sequence[str] | None, **overrides: Any) -> dict[str, Any]:
        """Engine keyword arguments for one call; per-call overrides of sampling and FlashBack settings
        are allowed, anything else is an error rather than silently ignored."""
        config_fields = set(FlashBackConfig.__dataclass_fields__)
        unknown = set(overrides) - _CALL_OPTIONS - config_fields
        if unknown:
            raise ConfigError(
                f"Unknown per-call option(s) {sorted(unknown)}. Accepted: {sorted(_CALL_OPTIONS | config_fields)}."
            )
        config = self.flashback_config()
        changes = {k: v for k, v in overrides.items() if k in config_fields}
        if changes:
            config = config.replace(**changes)
        if self.retriever is None and config.retrieves:
            config = config.replace(mode="none")  # no retriever: a plain local LLM
        stops = [*(self.stop or []), *(stop or [])]
        kwargs: dict[str, Any] = {
            "config": config,
            "max_new_tokens": overrides.get("max_tokens", overrides.get("max_new_tokens", self.max_new_tokens)),
            "temperature": overrides.get("temperature", self.temperature),
            "top_p": overrides.get("top_p", self.top_p),
            "top_k": overrides.get("top_k", self.top_k),
            "min_p": overrides.get("min_p", self.min_p),
            "repetition_penalty": overrides.get("repetition_penalty", self.repetition_penalty),
            "seed": overrides.get("seed", self.seed),
            "stop": stops or None,
        }
        if overrides.get("first_query") is not None:
            kwargs["first_query"] = overrides["first_query"]
        logprobs = overrides.get("logprobs", self.logprobs)
        top = overrides.get("top_logprobs", self.top_logprobs)
        if logprobs or top:
            kwargs["logprobs"], kwargs["top_logprobs"] = logprobs, top
        return kwargs


_CALL_OPTIONS = {
    "max_tokens",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "first_query",
    "logprobs",
    "top_logprobs",
}
