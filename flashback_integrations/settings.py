"""Settings shared by the LangChain and LlamaIndex classes (pydantic fields, no framework imports)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from .config import FlashBackConfig, LoadSettings, help_of
from .engine.backend import context_window_of
from .engine.layout import block_budget
from .engine.sampling import Sampling, validate_logprobs, validate_sampling
from .errors import ConfigError
from .loading.devices import auto_placement, check_model_kwargs
from .loading.shipped import default_mode_for
from .model import FlashBackModel

SETTINGS_CLASSES = (LoadSettings, FlashBackConfig, Sampling)


def _widen(tp: Any) -> Any:
    """The field type for pydantic: ``Literal`` choices become ``str`` so that the settings object's own
    check (a ``ConfigError`` naming the field and the choices) is what a bad value meets."""
    origin = get_origin(tp)
    if origin is Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_widen(a) for a in get_args(tp))]  # noqa: UP007 - built from a tuple
    return tp


def derived_fields(*classes: type) -> dict[str, Any]:
    """pydantic field definitions from settings dataclasses: the same names, defaults and help texts."""
    out: dict[str, Any] = {}
    for cls in classes:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                info = Field(default_factory=f.default_factory, description=help_of(f))
            else:
                info = Field(default=f.default, description=help_of(f))
            out[f.name] = (_widen(hints[f.name]), info)
    return out


ALIASES = {"num_predict": "max_new_tokens", "n_predict": "max_new_tokens", "repeat_penalty": "repetition_penalty",
           "model_name": "model"}  # fmt: skip
"""Other local-model classes' names (ChatOllama, ChatLlamaCpp, HuggingFacePipeline) for ours."""
REFUSED = {
    "num_ctx": "the context window is the model's own (a FlashBack call checks prompt + block + output against it)",
    "n_ctx": "the context window is the model's own (a FlashBack call checks prompt + block + output against it)",
    "format": "for JSON output use with_structured_output(schema) or bind(response_format={'type': 'json_object'}) "
    "in LangChain, structured_predict / as_structured_llm in LlamaIndex (grammar-constrained)",
    "base_url": "this class runs the model in this process; for a server pass backend='openai' and server_url=URL",
    "k": "passages per retrieval are num_passages (sampling's top-k is top_k)",
    "model_path": "pass model=FOLDER (holding model.gguf) with backend='llamacpp', or gguf=PATH",
}
"""Arguments of other local-model classes with no counterpart here: refused with ours named."""


def translate_arguments(data: dict[str, Any], known: set[str], where: str) -> dict[str, Any]:
    """``data`` with other classes' names mapped to ours; anything else unknown raises, naming the closest
    supported argument (nothing is silently dropped)."""
    import difflib

    out = dict(data)
    for key in list(out):
        if key in known:
            continue
        if key in ALIASES and ALIASES[key] in known:
            target = ALIASES[key]
            if target in out:
                raise ConfigError(f"{where}: {key!r} and {target!r} name the same setting; pass {target!r} only.")
            out[target] = out.pop(key)
            continue
        if key in REFUSED:
            raise ConfigError(f"{where}: {key!r} has no counterpart here: {REFUSED[key]}.")
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where} takes no argument {key!r}{hint} Nothing is ignored silently: remove it.")
    return out


class _Base(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())


# The loading, retrieval and sampling settings, each declared once (LoadSettings, FlashBackConfig, Sampling).
_Declared = create_model("FlashBackDeclaredSettings", __base__=_Base, **derived_fields(*SETTINGS_CLASSES))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlashBackConfig))
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))


class FlashBackSettings(_Declared):  # type: ignore[misc, valid-type]
    """Fields of every framework class: the engine's settings (``LoadSettings``, ``FlashBackConfig``,
    ``Sampling``) under the same names, plus what a framework class adds."""

    retriever: Any = None
    """A LangChain or LlamaIndex retriever, a ``ChromaRetriever``, or anything with ``retrieve(query, k)``."""
    logprobs: bool = False
    """Report each generated token's log-probability (OpenAI format)."""
    top_logprobs: int | None = None
    """With ``logprobs``: also the n most likely tokens at each step (0-20)."""
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    stop: list[str] | None = None
    flashback_model: FlashBackModel | None = Field(default=None, exclude=True)
    """An already loaded model; takes precedence over ``model``/``adapter``."""
    # Accepted so the class drops into code written for hosted models; a local model has no use for them.
    timeout: float | None = None
    max_retries: int | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _flashback_known_arguments(cls, data: Any) -> Any:
        """Unknown constructor arguments raise (pydantic would drop them); other classes' names map to ours."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        return translate_arguments(data, known, cls.__name__)

    @model_validator(mode="after")
    def _flashback_check_settings(self) -> FlashBackSettings:
        """Validate the FlashBack settings at construction, not at the first call (a validator rather
        than ``model_post_init``, which the frameworks' base classes use themselves)."""
        config = self.flashback_config()
        validate_logprobs(self.logprobs, self.top_logprobs)
        sampling = self.sampling()
        validate_sampling(
            sampling.temperature,
            sampling.top_p,
            self.max_new_tokens,
            sampling.seed,
            self.stop,
            sampling.top_k,
            sampling.min_p,
            sampling.repetition_penalty,
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
        return context_window_of(cfg)

    def prompt_window(self) -> int:
        """Context left to the prompt and the output once the largest retrieval block is placed."""
        fb = self.flashback()
        config = self.flashback_config()
        window = fb.context_window or 2048
        if self.retriever is not None and config.retrieves:
            marks = config.marks is not False and fb.mark_ids is not None
            window -= block_budget(config.num_passages, config.max_doc_tokens, marks)
        return window

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if self.flashback_model is not None:
            return self.flashback_model.config.mode
        return default_mode_for(self.model, self.adapter)

    def flashback_config(self) -> FlashBackConfig:
        values = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return FlashBackConfig(**{**values, "mode": self.resolved_mode()})

    def sampling(self) -> Sampling:
        return Sampling(**{name: getattr(self, name) for name in SAMPLING_FIELDS})

    def flashback(self) -> FlashBackModel:
        """The engine model, loaded on first use and shared by every instance with the same weights."""
        if self.flashback_model is not None:
            return self.flashback_model
        # no private attribute here: pydantic would install its own model_post_init on this mixin and
        # shadow the framework base classes' one; the shared registry is the cache
        return FlashBackModel.shared(self.model, self.adapter, mode=self.resolved_mode(), **self._load_kwargs())

    def _load_kwargs(self) -> dict[str, Any]:
        load = LoadSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoadSettings)})
        return load.load_kwargs()

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
        overrides = translate_arguments(overrides, _CALL_OPTIONS | config_fields, "a call")
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
            **{name: overrides.get(name, getattr(self, name)) for name in SAMPLING_FIELDS},
            "stop": stops or None,
        }
        if overrides.get("first_query") is not None:
            kwargs["first_query"] = overrides["first_query"]
        logprobs = overrides.get("logprobs", self.logprobs)
        top = overrides.get("top_logprobs", self.top_logprobs)
        if logprobs or top:
            kwargs["logprobs"], kwargs["top_logprobs"] = logprobs, top
        return kwargs


_CALL_OPTIONS = {"max_tokens", "max_new_tokens", "first_query", "logprobs", "top_logprobs", *SAMPLING_FIELDS}
