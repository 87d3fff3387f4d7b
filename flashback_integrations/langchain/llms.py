"""``FlashBackLLM``: a LangChain text LLM that retrieves every ``stride`` tokens and reuses its cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ..events import FinishEvent, GenerationResult, TokenEvent, final_result
from ._common import EventBridge, FlashBackSettings, RunRetriever, retrieval_payload


def _generation_info(result: GenerationResult) -> dict[str, Any]:
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "retrievals": [retrieval_payload(r) for r in result.retrievals],
    }


class FlashBackLLM(FlashBackSettings, BaseLLM):
    """Text completion with FlashBack retrieval; the prompt is never echoed.

    Calls are independent (each has its own KV cache), so ``batch`` and threads run in parallel and
    give the same outputs as sequential calls.
    """

    @property
    def _llm_type(self) -> str:
        return "flashback"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, **self.flashback_config().to_dict()}

    def _run(self, prompt: str, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None, **kwargs: Any):
        fb, _ = self.flashback_for_call(kwargs)
        retriever = RunRetriever(self.retriever, run_manager) if self.retriever is not None else None
        return fb.stream(
            prompt, retriever, callbacks=[EventBridge(run_manager)], **self.generation_kwargs(stop, **kwargs)
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations: list[list[Generation]] = []
        prompt_tokens = completion_tokens = 0
        for prompt in prompts:
            result = final_result(self._run(prompt, stop, run_manager, **kwargs))
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            generations.append([Generation(text=result.text, generation_info=_generation_info(result))])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for event in self._run(prompt, stop, run_manager, **kwargs):
            if isinstance(event, TokenEvent) and event.text:
                chunk = GenerationChunk(text=event.text)
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
            elif isinstance(event, FinishEvent):
                yield GenerationChunk(text="", generation_info=_generation_info(event.result))
