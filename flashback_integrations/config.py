"""FlashBack settings: one validated, serialisable object shared by the engine, CLI and adapters."""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError

Mode = Literal["append", "prepend", "isolated", "none"]
MODES: tuple[str, ...] = ("append", "prepend", "isolated", "none")
ON_ERROR: tuple[str, ...] = ("raise", "skip")


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A settings field with its help text: the one declaration the CLI options and the framework
    classes' fields are derived from (peft's ``field(metadata={"help": ...})``)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(f: Field) -> str:
    return f.metadata.get("help", "")


def require_positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    """The settings objects' shared check: each named field is an int > 0 (``True`` is not an int here)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


@dataclass
class FlashBackConfig:
    """How retrieval is interleaved with generation (docs/method.md).

    mode: ``append`` (FlashBack: block after the input, cache of the input kept), ``prepend``
    (In-Context RALM: block before the input, cache recomputed), ``isolated`` (each passage on its
    own at negative positions, read by the last ``tail_tokens`` tokens; both caches kept; rotary
    models only) or ``none``.
    stride: retrieve every ``stride`` generated tokens (``s``).
    query_tokens: the query is the text of the last ``query_tokens`` tokens (``l``).
    num_passages: passages per retrieval (the ``k`` passed to the retriever); each is cut to
    ``max_doc_tokens`` tokens. Named apart from sampling's ``top_k`` on purpose.
    marks: bound the block with ``<MARK_L>``/``<MARK_R>``; ``None`` uses them when the model has them.
    on_retrieval_error: ``raise`` stops generation; ``skip`` generates that stride without a block.
    retrieval_timeout: seconds a retrieval may take before it counts as failed (``None``: no limit).
    tail_tokens: ``isolated`` only: history tokens (``t``) that attend to the passages; each retrieval
    re-feeds ``stride + tail_tokens`` tokens. ``None``: the loaded adapter's setting, else 1 (the
    cheapest). Longer tails read the passage better (validation loss in docs/results-shipped-default.md).
    passage_sink: ``isolated`` only: passages also attend to the text's first token (measured 1% better;
    off by default so the layout is exactly docs/method.md's table).
    block_offset: ``append`` only: place the block ``k`` tokens back, ``P + G[:j-k] + block + G[j-k:]``,
    the portable variant for engines that only reuse causal prefixes (0 = the paper's layout).
    question_passages: retrieve the question's top ``k`` passages once and put them into the prompt (the last
    user turn of a chat, before the question), as a LangChain stuff chain does; periodic retrieval goes on as
    ``mode`` says (``mode="none"`` with it is a plain stuff chain). 0 = off. ``None``: 1 in a chat that has a
    retriever and retrieves (both together answered the QA set best: docs/evaluation.md), 0 for a text prompt.
    """

    mode: Mode | None = setting(
        None, "append | prepend | isolated | none (default: the model's adapter's layout; 'default': isolated)."
    )
    stride: int = setting(16, "Retrieve every N generated tokens (s).")
    query_tokens: int = setting(32, "The query is the text of the last N tokens (l).")
    num_passages: int = setting(1, "Passages per retrieval (the k given to the retriever).")
    max_doc_tokens: int = setting(128, "Tokens kept of each passage.")
    marks: bool | None = setting(None, "Bound the block with the marking tokens (default: when the model has them).")
    on_retrieval_error: Literal["raise", "skip"] = setting(
        "raise", "raise | skip (generate that stride without a block)."
    )
    retrieval_timeout: float | None = setting(None, "Seconds a retrieval may take before it counts as failed.")
    tail_tokens: int | None = setting(
        None, "isolated: history tokens that read the passages (default: the adapter's, else 1)."
    )
    passage_sink: bool = setting(False, "isolated: passages also attend to the text's first token.")
    block_offset: int = setting(0, "append: place the block N tokens back (0 = the paper's layout).")
    question_passages: int | None = setting(
        None,
        "Also put the question's top N passages into the prompt once (a chat's user turn), as a stuff chain does "
        "(default: 1 in a chat with a retriever, 0 for text).",
    )

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}.")
        require_positive_ints(self, ("stride", "query_tokens", "num_passages", "max_doc_tokens"))
        if self.marks is not None and not isinstance(self.marks, bool):
            raise ConfigError(f"marks must be True, False or None (auto), got {self.marks!r}.")
        if self.on_retrieval_error not in ON_ERROR:
            raise ConfigError(f"on_retrieval_error={self.on_retrieval_error!r} is not one of {ON_ERROR}.")
        timeout = self.retrieval_timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or math.isnan(timeout) or timeout <= 0
        ):
            raise ConfigError(
                f"retrieval_timeout must be a number of seconds > 0, or None for no limit, got {timeout!r} "
                f"({type(timeout).__name__})."
            )
        if timeout is not None and math.isinf(timeout):
            self.retrieval_timeout = None  # no limit, said the usual way (a thread join cannot wait inf seconds)
        if self.tail_tokens is not None:
            require_positive_ints(self, ("tail_tokens",))
        if not isinstance(self.passage_sink, bool):
            raise ConfigError(f"passage_sink must be True or False, got {self.passage_sink!r}.")
        if self.passage_sink and self.mode in ("append", "prepend"):
            raise ConfigError(f"passage_sink=True applies to mode='isolated' only, not {self.mode!r}; drop it.")
        offset = self.block_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"block_offset must be an integer >= 0, got {offset!r}.")
        if offset and self.mode in ("prepend", "isolated"):
            raise ConfigError(f"block_offset applies to mode='append' only, not {self.mode!r}; set it to 0.")
        k = self.question_passages
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"question_passages must be an integer >= 0 (0 = off) or None (auto), got {k!r}.")

    @property
    def retrieves(self) -> bool:
        return self.mode != "none"

    def question_k(self, *, chat: bool, retriever: Any) -> int:
        """``question_passages`` as set, else the chat default: 1 when a chat has a retriever and retrieves."""
        if self.question_passages is not None:
            return self.question_passages
        return 1 if chat and retriever is not None and self.retrieves else 0

    def replace(self, **changes: Any) -> FlashBackConfig:
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            hint = (
                " (passages per retrieval are num_passages; top_k is a sampling setting)" if "top_k" in unknown else ""
            )
            raise ConfigError(f"Unknown FlashBackConfig field(s): {sorted(unknown)}{hint}.")
        return FlashBackConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlashBackConfig:
        """From a manifest; manifests written before the rename say ``top_k`` for ``num_passages``."""
        data = rename_legacy(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rename_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Settings saved by earlier versions (adapter manifests, example files) named the passages per
    retrieval ``top_k``."""
    if "top_k" in data and "num_passages" not in data:
        data = {("num_passages" if k == "top_k" else k): v for k, v in data.items()}
    return data


@dataclass(frozen=True)
class LoadSettings:
    """How a model is loaded: ``FlashBackModel.from_pretrained``'s arguments, for the CLI and the
    framework classes alike."""

    model: str = setting("default", "'default', a hub id or a local path.")
    adapter: str | None = setting(None, "FlashBack adapter directory (LoRA + marking tokens).")
    dtype: str | None = setting(None, "float32 | bfloat16 | float16 (default: bf16 on a GPU, else fp32).")
    device: str | None = setting(None, "cpu | cuda | cuda:N (default: the GPU when there is one).")
    revision: str | None = setting(None, "Hub branch, tag or commit of the model.")
    trust_remote_code: bool = setting(False, "Run the model repository's own code (trusted repositories only).")
    backend: str = setting(
        "auto",
        "torch | llamacpp (a GGUF on llama.cpp; the default model: isolated with its adapter as a LoRA GGUF) | "
        "openai (a completions server with prefix caching: llama-server, vLLM; modes none, prepend, append) | auto "
        "(llamacpp for the default model on a CPU when llama-cpp-python is installed, else torch).",
    )
    gguf: str | None = setting(None, "llamacpp: the GGUF file (default: MODEL/model.gguf, or the default model's).")
    server_url: str | None = setting(
        None, "openai: the server's URL, e.g. http://127.0.0.1:8080 (API key: $OPENAI_API_KEY)."
    )
    served_model: str | None = setting(None, "openai: the model name on the server (default: the one it serves).")
    model_kwargs: dict[str, Any] = setting(
        help="More from_pretrained arguments: device_map, quantization_config, attn_implementation "
        "(a JSON object on the command line).",
        factory=dict,
    )

    def __post_init__(self) -> None:
        from .loading.devices import check_model_kwargs, check_trust_remote_code

        check_trust_remote_code(self.trust_remote_code)
        object.__setattr__(self, "model_kwargs", check_model_kwargs(self.model_kwargs))  # frozen: set once
        if self.model_kwargs and self.backend not in ("torch", "auto"):
            raise ConfigError(
                f"model_kwargs are from_pretrained arguments of the torch backend; backend={self.backend!r} "
                "loads no transformers model. Drop them."
            )

    def _where(self) -> dict[str, Any]:
        if self.backend == "openai":
            return {"server_url": self.server_url, "served_model": self.served_model}
        return {"gguf": self.gguf}

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``FlashBackModel.shared``/``from_pretrained`` besides model and adapter."""
        return {
            **self.model_kwargs,  # checked: none of them names an argument below, which come last anyway
            "dtype": self.dtype,
            "device": self.device,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "backend": self.backend,
            **{k: v for k, v in self._where().items() if v is not None},
        }
