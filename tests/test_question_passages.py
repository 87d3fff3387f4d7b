"""``question_passages=k``: the question's top-k passages put into the prompt once (the user turn of a chat), as
a LangChain stuff chain does, with periodic retrieval on top; the same in the engine, both frameworks, the
server and the CLI, and exactly the stuffed prompt a user would write by hand."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.llms import ChatMessage
from tiny import POOL, HashRetriever, make_chat_model, save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.chat import with_context
from flashback_integrations.errors import ConfigError, RetrievalError
from flashback_integrations.langchain import ChatFlashBack
from flashback_integrations.llama_index import FlashBackLLM

QUESTION = "How does the retrieval augmented model read passages?"


@pytest.fixture(scope="module")
def fb() -> FlashBackModel:
    model, tok = make_chat_model("llama")
    return FlashBackModel(model, tok, name="tiny-chat")


def stuffed(fb, retriever, question: str, k: int = 1, max_doc_tokens: int = 128) -> str:
    """What a user writes by hand: the top passages, cut to max_doc_tokens tokens, before the question."""
    from flashback_integrations.engine.layout import passage_segments
    from flashback_integrations.retrieval import coerce_passages

    passages = coerce_passages(retriever.retrieve(question, k), source="test")
    cut = [fb.tokenizer.decode(ids) for ids in passage_segments(fb.tokenizer, passages, max_doc_tokens, None)]
    return with_context(cut, question)


def test_the_engine_puts_the_passages_before_a_text_prompt(fb) -> None:
    retriever = HashRetriever()
    config = FlashBackConfig(mode="none", question_passages=2, max_doc_tokens=12)
    result = fb.generate(QUESTION, retriever, config=config, max_new_tokens=8)
    by_hand = fb.generate(stuffed(fb, HashRetriever(), QUESTION, 2, 12), config=FlashBackConfig(mode="none"),
                          max_new_tokens=8)  # fmt: skip
    assert result.token_ids == by_hand.token_ids
    assert result.question.query == QUESTION and len(result.question.passages) == 2
    assert result.question.passages[0].text in POOL and result.retrievals == []
    both = fb.generate(QUESTION, retriever, config=config.replace(mode="append", stride=4), max_new_tokens=8)
    assert both.question is not None and [r.step for r in both.retrievals] == [0, 4]


def test_chat_models_put_them_into_the_user_turn(fb) -> None:
    options = {"mode": "none", "max_tokens": 8, "max_doc_tokens": 16}
    chat = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), question_passages=1, **options)
    message = chat.invoke(QUESTION)
    by_hand = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), **options)
    assert message.content == by_hand.invoke([HumanMessage(stuffed(fb, HashRetriever(), QUESTION, 1, 16))]).content
    record = message.response_metadata["question_retrieval"]
    assert record["query"] == QUESTION and record["passages"][0]["snippet"]
    streamed = "".join(c.content for c in chat.stream(QUESTION))
    assert streamed == message.content
    llm = FlashBackLLM(flashback_model=fb, retriever=HashRetriever(), question_passages=1, **options)
    answer = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert answer.message.content == message.content
    assert answer.raw["question_retrieval"]["query"] == QUESTION


def test_a_chat_with_a_retriever_gets_one_question_passage_by_default(fb) -> None:
    """The chat default (QA set: 0.375 with it on top of periodic retrieval, 0.165 without); text prompts, chats
    without a retriever and mode="none" keep 0, and an explicit value always wins."""
    default = FlashBackConfig()
    assert default.question_k(chat=True, retriever=HashRetriever()) == 1
    assert default.question_k(chat=True, retriever=None) == 0
    assert default.question_k(chat=False, retriever=HashRetriever()) == 0
    assert FlashBackConfig(mode="none").question_k(chat=True, retriever=HashRetriever()) == 0
    assert FlashBackConfig(question_passages=0).question_k(chat=True, retriever=HashRetriever()) == 0
    options = {"mode": "append", "stride": 4, "max_tokens": 8, "max_doc_tokens": 16}
    chat = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), **options).invoke(QUESTION)
    explicit = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), question_passages=1, **options)
    assert chat.content == explicit.invoke(QUESTION).content
    assert chat.response_metadata["question_retrieval"]["query"] == QUESTION
    off = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), question_passages=0, **options).invoke(QUESTION)
    assert off.response_metadata["question_retrieval"] is None and off.response_metadata["retrievals"]
    llm = FlashBackLLM(flashback_model=fb, retriever=HashRetriever(), **options)
    assert llm.chat([ChatMessage(role="user", content=QUESTION)]).raw["question_retrieval"]["query"] == QUESTION
    assert llm.complete(QUESTION).raw["question_retrieval"] is None  # a text prompt is continued as it is
    text = fb.generate(QUESTION, HashRetriever(), config=FlashBackConfig(mode="append"), max_new_tokens=2)
    assert text.question is None


def test_the_server_takes_it_per_request(fb) -> None:
    import openai

    from flashback_integrations.serve import ServeSettings, create_app, serve_in_thread

    expected = ChatFlashBack(flashback_model=fb, retriever=HashRetriever(), mode="append", stride=4, max_tokens=8,
                             question_passages=1).invoke(QUESTION)  # fmt: skip
    app = create_app(fb, ServeSettings(model_name="tiny"), config=FlashBackConfig(mode="append", stride=4),
                     retrievers={"docs": HashRetriever()}, default_collection="docs")  # fmt: skip
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
            extra_body={"flashback": {"question_passages": 1}},
        )  # fmt: skip
    assert reply.choices[0].message.content == expected.content
    info = reply.model_extra["flashback"]
    assert info["question_retrieval"]["query"] == QUESTION and len(info["retrievals"]) == 2


def test_bad_uses_are_errors_and_a_failing_retriever_follows_the_policy(fb) -> None:
    config = FlashBackConfig(mode="none", question_passages=1)
    with pytest.raises(ConfigError, match="needs a retriever"):
        fb.generate(QUESTION, None, config=config, max_new_tokens=2)
    with pytest.raises(ConfigError, match="text prompt"):
        fb.generate(fb.encode(QUESTION), HashRetriever(), config=config, max_new_tokens=2)
    with pytest.raises(ConfigError, match="question_passages must be"):
        FlashBackConfig(question_passages=-1)

    def down(query: str, k: int) -> list[str]:
        raise ConnectionError("store down")

    with pytest.raises(RetrievalError, match="store down"):
        fb.generate(QUESTION, down, config=config, max_new_tokens=2)
    skipped = fb.generate(QUESTION, down, config=config.replace(on_retrieval_error="skip"), max_new_tokens=4)
    plain = fb.generate(QUESTION, config=FlashBackConfig(mode="none"), max_new_tokens=4)
    assert skipped.token_ids == plain.token_ids and "store down" in skipped.question.error


def test_the_cli_shows_the_questions_passages(tmp_path) -> None:
    from flashback_integrations.cli import app

    model = save_tiny_chat_model(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "kettle.txt").write_text("Error E4 means the water tank of the kettle is empty.")
    result = CliRunner().invoke(app, [
        "generate", "What does E4 mean?", "--chat", "--model", model, "--mode", "none", "--question-passages", "1",
        "--corpus", str(corpus), "--max-new-tokens", "4",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "passages for the question" in result.output and "kettle.txt" in result.output
