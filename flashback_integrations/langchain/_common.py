"""What the LangChain LLM and chat model share: settings, the shared model, and retrieval reporting."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from ..events import FlashBackCallback, Retrieval
from ..retrieval import Passage, as_retrieve_fn
from ..retrieval.adapt import LangChainRetrieverAdapter
from ..settings import FlashBackSettings

RETRIEVAL_EVENT = "flashback_retrieval"
__all__ = ["RETRIEVAL_EVENT", "EventBridge", "FlashBackCallbackHandler", "FlashBackSettings", "RunRetriever"]


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
            config = {"callbacks": callbacks, "run_name": "flashback_retrieval"}
            return LangChainRetrieverAdapter(self.retriever, config=config).retrieve(query, k)
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


class EventBridge(FlashBackCallback):
    """Engine retrieval callbacks -> a LangChain custom event on the LLM run."""

    def __init__(self, run_manager: Any | None) -> None:
        self.run_manager = run_manager

    def on_retrieval_end(self, retrieval: Retrieval) -> None:
        if self.run_manager is None:
            return
        _child_manager(self.run_manager).on_custom_event(
            RETRIEVAL_EVENT, retrieval.payload(), run_id=self.run_manager.run_id
        )


class FlashBackCallbackHandler(BaseCallbackHandler):
    """Collects every periodic retrieval of the runs it is attached to, in order."""

    def __init__(self) -> None:
        self.retrievals: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: Any, **kwargs: Any) -> None:
        if name == RETRIEVAL_EVENT:
            self.retrievals.append({**data, "run_id": run_id})
