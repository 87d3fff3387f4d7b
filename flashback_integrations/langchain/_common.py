"""What the LangChain LLM and chat model share: settings, the shared model, and retrieval reporting."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..config import FlashBackConfig
from ..events import FlashBackCallback, Retrieval
from ..model import FlashBackModel
from ..retrieval import Passage, as_retrieve_fn

RETRIEVAL_EVENT = "flashback_retrieval"


class FlashBackSettings(BaseModel):
    """Fields of both LangChain classes; names follow the engine's ``FlashBackConfig``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    model: str = "default"
    """``"default"`` (SmolLM2-135M-Instruct, offline), a hub id or a local path."""
    adapter: str | None = None
    """FlashBack adapter directory (LoRA + marking tokens)."""
    retriever: Any = None
    """A LangChain ``BaseRetriever``, a ``ChromaRetriever``, or anything with ``retrieve(query, k)``."""
    mode: str = "append"
    stride: int = 16
    query_tokens: int = 32
    top_k: int = 1
    max_doc_tokens: int = 128
    marks: bool | None = None
    on_retrieval_error: str = "raise"
    retrieval_timeout: float | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    stop: list[str] | None = None
    dtype: str = "float32"
    device: str | None = None
    flashback_model: FlashBackModel | None = Field(default=None, exclude=True)
    """An already loaded model; takes precedence over ``model``/``adapter``."""
    # Accepted so the class drops into code written for hosted models; a local model has no use for them.
    timeout: float | None = None
    max_retries: int | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)

    _fb: FlashBackModel | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        self.flashback_config()  # validate settings at construction, not at the first call

    def flashback_config(self) -> FlashBackConfig:
        return FlashBackConfig(
            mode=self.mode,  # type: ignore[arg-type]
            stride=self.stride,
            query_tokens=self.query_tokens,
            top_k=self.top_k,
            max_doc_tokens=self.max_doc_tokens,
            marks=self.marks,
            on_retrieval_error=self.on_retrieval_error,  # type: ignore[arg-type]
            retrieval_timeout=self.retrieval_timeout,
        )

    def flashback(self) -> FlashBackModel:
        """The engine model, loaded on first use and shared by every instance with the same weights."""
        if self.flashback_model is not None:
            return self.flashback_model
        if self._fb is None:
            self._fb = FlashBackModel.shared(self.model, self.adapter, dtype=self.dtype, device=self.device)
        return self._fb

    def flashback_for_call(self, kwargs: dict[str, Any]) -> tuple[FlashBackModel, str]:
        """The model for one call: ``invoke(..., model="other")`` overrides the configured one."""
        override = kwargs.pop("model", None)
        if override is None or override == self.model:
            return self.flashback(), self.model_label()
        return FlashBackModel.shared(override, self.adapter, dtype=self.dtype, device=self.device), override

    def model_label(self) -> str:
        return self.flashback_model.name if self.flashback_model is not None else self.model

    def generation_kwargs(self, stop: Sequence[str] | None, **overrides: Any) -> dict[str, Any]:
        config = self.flashback_config()
        if self.retriever is None and config.retrieves:
            config = config.replace(mode="none")  # no retriever: a plain local LLM
        stops = [*(self.stop or []), *(stop or [])]
        kwargs = {
            "config": config,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stops or None,
        }
        kwargs.update({k: v for k, v in overrides.items() if k in kwargs or k == "first_query"})
        if "max_tokens" in overrides:
            kwargs["max_new_tokens"] = overrides["max_tokens"]
        return kwargs


def _child_manager(run_manager: Any) -> CallbackManager:
    """A callback manager whose runs are children of the LLM run (FRAMEWORKS.md recipe)."""
    manager = CallbackManager(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    # configure() adds the context-var hooks (collect_runs, LangSmith tracing) that are not inheritable
    return CallbackManager.configure(inheritable_callbacks=manager)


def passage_to_document(passage: Passage) -> Document:
    return Document(page_content=passage.text, metadata=dict(passage.metadata), id=passage.id)


class RunRetriever:
    """The engine's retriever for one LLM run: each retrieval becomes a child retriever run.

    A LangChain retriever is invoked with the child callbacks, so it creates its own run; any other
    retriever gets a retriever run emitted around it.
    """

    def __init__(self, retriever: Any, run_manager: Any | None) -> None:
        self.retriever = retriever
        self.run_manager = run_manager
        self._plain = None if isinstance(retriever, BaseRetriever) else as_retrieve_fn(retriever)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        callbacks = _child_manager(self.run_manager) if self.run_manager is not None else None
        if self._plain is None:
            docs = self.retriever.invoke(query, config={"callbacks": callbacks, "run_name": "flashback_retrieval"})
            return [Passage(text=d.page_content, id=d.id, metadata=dict(d.metadata or {})) for d in docs[:k]]
        if callbacks is None:
            return self._plain(query, k)
        run = callbacks.on_retriever_start(
            {"name": type(self.retriever).__name__}, query, name=f"flashback_retrieval:{type(self.retriever).__name__}"
        )
        try:
            passages = self._plain(query, k)
        except BaseException as exc:
            run.on_retriever_error(exc)
            raise
        run.on_retriever_end([passage_to_document(p) for p in passages])
        return passages


def retrieval_payload(r: Retrieval) -> dict[str, Any]:
    return {
        "step": r.step,
        "query": r.query,
        "passage_ids": [p.id for p in r.passages],
        "block_tokens": r.block_tokens,
        "latency_s": r.latency_s,
        "reused_tokens": r.reused_tokens,
        "prefill_tokens": r.prefill_tokens,
        "error": r.error,
    }


class EventBridge(FlashBackCallback):
    """Engine retrieval callbacks -> a LangChain custom event on the LLM run."""

    def __init__(self, run_manager: Any | None) -> None:
        self.run_manager = run_manager

    def on_retrieval_end(self, retrieval: Retrieval) -> None:
        if self.run_manager is None:
            return
        _child_manager(self.run_manager).on_custom_event(
            RETRIEVAL_EVENT, retrieval_payload(retrieval), run_id=self.run_manager.run_id
        )


class FlashBackCallbackHandler(BaseCallbackHandler):
    """Collects every periodic retrieval of the runs it is attached to, in order."""

    def __init__(self) -> None:
        self.retrievals: list[dict[str, Any]] = []
        self._started = time.perf_counter()

    def on_custom_event(self, name: str, data: Any, *, run_id: Any, **kwargs: Any) -> None:
        if name == RETRIEVAL_EVENT:
            self.retrievals.append({**data, "run_id": run_id})
