"""LangChain integration: drop-in LLM and chat model with periodic appended retrieval.

Needs the ``langchain`` extra: ``pip install "flashback-integrations[langchain]"``.
"""

from ._common import RETRIEVAL_EVENT, FlashBackCallbackHandler
from .chat_models import ChatFlashBack
from .embeddings import FlashBackEmbeddings
from .llms import FlashBackLLM

__all__ = ["RETRIEVAL_EVENT", "ChatFlashBack", "FlashBackCallbackHandler", "FlashBackEmbeddings", "FlashBackLLM"]
