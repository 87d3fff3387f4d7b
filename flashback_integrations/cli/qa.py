"""``flashback eval qa``: answers, not perplexity. Builds a QA set from documentation with known answers, then
answers it in several ways on the same questions and the same retriever, with bootstrap intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import console, eval_app, fail
from .options import Out, Seed, Stem

DOCS_HELP = "The Python docs' reST sources (apt-get install python3.11-doc: /usr/share/doc/python3.11/html/_sources)."


@eval_app.command("qa-build")
def qa_build(
    out_file: Annotated[Path, typer.Argument(help="The QA set to write (JSONL).")],
    docs: Annotated[Path, typer.Option(help=DOCS_HELP)] = Path("/usr/share/doc/python3.11/html/_sources"),
    questions: Annotated[int | None, typer.Option(help="Keep a seeded sample of N questions (default: all).")] = None,
    seed: Seed = 0,
) -> None:
    """Write the Python-docs QA set: each library function's description as the question, its name the answer."""
    from ..training.qa import python_function_questions, sample, write_jsonl

    if not (docs / "library").is_dir():
        raise fail(FileNotFoundError(f"{docs}/library is not there. {DOCS_HELP}"))
    items = sample(python_function_questions(docs), questions, seed)
    digest = write_jsonl(items, out_file)
    command = f"flashback eval qa-build {out_file} --docs {docs}" + (f" --questions {questions}" if questions else "")
    meta = {"command": f"{command} --seed {seed}", "questions": len(items), "sha256": digest}
    out_file.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2))
    console.print(f"wrote {len(items)} questions to {out_file} (sha256 {digest[:16]}...)")


@eval_app.command("qa")
def eval_qa(
    questions_file: Annotated[Path, typer.Argument(help="A QA set (flashback eval qa-build).")],
    docs: Annotated[Path, typer.Option(help="Documents to retrieve from (BM25, 80-word chunks). " + DOCS_HELP)] = Path(
        "/usr/share/doc/python3.11/html/_sources/library"
    ),
    rows: Annotated[str | None, typer.Option(help="Comma-separated row names (default: all).")] = None,
    limit: Annotated[int | None, typer.Option(help="The first N questions only.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 24,
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens (the periodic rows).")] = 8,
    langchain_check: Annotated[
        int, typer.Option(help="Answer the first N again through a LangChain chain over ChatFlashBack.")
    ] = 20,
    out: Out = Path("benchmarks/results"),
    stem: Stem = "qa_python",
) -> None:
    """Answer the set closed-book, stuffed, FlashBack (isolated) alone, both (the chat default), prepend, append."""
    from rich.progress import Progress

    from ..config import FlashBackConfig
    from ..model import FlashBackModel
    from ..retrieval import BM25Retriever
    from ..training.qa import ROWS, answer_one, read_jsonl, summarise

    items = read_jsonl(questions_file)[:limit]
    chosen = list(ROWS) if rows is None else [r.strip() for r in rows.split(",")]
    unknown = [r for r in chosen if r not in ROWS]
    if unknown or not items:
        raise fail(ValueError(f"unknown rows {unknown}; the rows: {list(ROWS)}" if unknown else "no questions"))
    retriever = BM25Retriever.from_files([docs], chunk_words=80)
    base = FlashBackConfig(stride=stride, query_tokens=32, num_passages=1, max_doc_tokens=128)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{stem}.partial.json"
    key = {"questions": [q.id for q in items], "max_new_tokens": max_new_tokens, "stride": stride}
    answers: dict[str, list[dict[str, Any]]] = {}
    if partial.is_file():  # a stopped run with the same settings: its finished rows are kept
        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            answers = {label: rows_ for label, rows_ in saved["answers"].items() if label in chosen}
    with Progress(console=console) as progress:
        for label in chosen:
            if label in answers:
                console.print(f"{label}: kept from {partial.name}")
                continue
            options = ROWS[label]
            fb = FlashBackModel.shared("default", mode=options.get("mode", "isolated"))
            config = fb.resolve_config(base.replace(**options))
            task = progress.add_task(label, total=len(items))
            done = []
            for item in items:
                done.append(answer_one(fb, item, retriever, config, max_new_tokens))
                progress.advance(task)
            answers[label] = done
            partial.write_text(json.dumps({"key": key, "answers": answers}))
            row = summarise({label: done})[label]
            console.print(  # a line per row, also when the output is not a terminal
                f"{label}: EM {row['exact_match']['mean']:.3f}, contains {row['contains']['mean']:.3f}, "
                f"{row['seconds_per_answer']:.2f} s/answer ({config.mode}, {done[0]['backend']})"
            )
    summary = summarise(answers)
    for label, s in summary.items():
        em, contains = s["exact_match"], s["contains"]
        console.print(
            f"{label:<48} EM {em['mean']:.3f} ({em['low']:.3f}-{em['high']:.3f})  contains {contains['mean']:.3f} "
            f"({contains['low']:.3f}-{contains['high']:.3f})  {s['seconds_per_answer']:.2f} s/answer"
        )
    check = (
        _langchain_check(items[:langchain_check], retriever, base, max_new_tokens, answers) if langchain_check else None
    )
    result = {
        "command": f"flashback eval qa {questions_file} --docs {docs} --max-new-tokens {max_new_tokens} "
        f"--stride {stride}" + (f" --limit {limit}" if limit else "") + (f" --rows '{rows}'" if rows else ""),
        "questions": len(items),
        "rows": summary,
        "langchain_check": check,
        "answers": answers,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out / (stem + '.json')}")


def _langchain_check(items: list, retriever: Any, base: Any, max_new_tokens: int, answers: dict) -> dict[str, Any]:
    """The chat default's row again through ``prompt | ChatFlashBack | parser``: what a chain user gets."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from ..langchain import ChatFlashBack

    label = "isolated + stuffed (chat default)"
    if label not in answers:
        return {"skipped": f"the {label!r} row was not run"}
    llm = ChatFlashBack(model="default", retriever=retriever, max_tokens=max_new_tokens, stride=base.stride,
                        query_tokens=base.query_tokens, num_passages=1, max_doc_tokens=base.max_doc_tokens)  # fmt: skip
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm | StrOutputParser()
    same = sum(
        chain.invoke({"question": q.question}) == a["answer"] for q, a in zip(items, answers[label], strict=False)
    )
    console.print(f"LangChain chain over ChatFlashBack: {same}/{len(items)} answers identical to the {label!r} row")
    return {"row": label, "identical": same, "of": len(items)}
