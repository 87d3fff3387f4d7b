"""``FlashBackLLM``: a LangChain text LLM that retrieves every ``stride`` tokens and reuses its cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ..events import FinishEvent, GenerationResult, TokenEvent, final_result, logprobs_payload
from ._common import EventBridge, FlashBackSettings, RunRetriever


def _generation_info(result: GenerationResult, tokenizer: Any) -> dict[str, Any]:
    info = {
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "retrievals": [r.payload() for r in result.retrievals],
        "mode": result.mode,
        "mode_reason": result.mode_reason,
        "question_retrieval": result.question.payload() if result.question is not None else None,
        "backend": result.backend,
    }
    if result.logprobs is not None:  # with logprobs=True: OpenAI's format, as ChatFlashBack reports it
        info["logprobs"] = logprobs_payload(tokenizer, result.logprobs)
    return info


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
        events = fb.stream(
            prompt, retriever, callbacks=[EventBridge(run_manager)], **self.generation_kwargs(stop, **kwargs)
        )
        return events, fb.tokenizer

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
            events, tokenizer = self._run(prompt, stop, run_manager, **kwargs)
            result = final_result(events)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            generations.append([Generation(text=result.text, generation_info=_generation_info(result, tokenizer))])
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
        events, tokenizer = self._run(prompt, stop, run_manager, **kwargs)
        for event in events:
            if isinstance(event, TokenEvent) and event.text:
                chunk = GenerationChunk(text=event.text)
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
            elif isinstance(event, FinishEvent):
                yield GenerationChunk(text="", generation_info=_generation_info(event.result, tokenizer))
