"""Issue 42's check on a product-docs set of our own: five short documents in a Chroma collection, five
questions with the words a correct answer must contain, answered by ChatFlashBack on the default model in four
ways: isolated periodic retrieval alone (the default before question_passages), stuffed (question_passages=1, no
periodic retrieval: a stuff chain), both (the chat default now), and no retrieval. Greedy, 64 tokens. A small set
for a first look, not an evaluation (issue 38).

    .venv/bin/python benchmarks/product_questions.py  # writes benchmarks/results/product_questions.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from flashback_integrations.langchain import ChatFlashBack
from flashback_integrations.store import ChromaRetriever, Embedder, connect, ingest

DOCS = {
    "warranty.md": "The K3 kettle comes with a warranty of two years from the date of purchase. The warranty "
    "covers the heating element and the switch, not the glass jug.",
    "errors.md": "Error codes of the K3 kettle. E4 means the water tank is empty: refill it above the MIN line. "
    "E7 means the kettle overheated: unplug it and let it cool for ten minutes.",
    "cleaning.md": "Descale the K3 kettle once a month. Fill it with one litre of water and two spoons of citric "
    "acid, boil, wait twenty minutes, then rinse twice.",
    "shipping.md": "Orders ship from Rotterdam within three working days. Delivery inside the EU is free for "
    "orders above 40 euros; below that it costs 4.95 euros.",
    "returns.md": "You can return a product within 30 days if it is unused and in its original box. Refunds "
    "reach your account within 14 days after we receive the parcel.",
}
QUESTIONS = [
    ("How long is the warranty of the K3 kettle?", ["two years", "2 years"]),
    ("What does error code E4 mean on the K3 kettle?", ["empty", "refill"]),
    ("How much citric acid do I use to descale the K3?", ["two spoons", "2 spoons"]),
    ("How much does delivery cost for an order of 30 euros?", ["4.95"]),
    ("How many days do I have to return a product?", ["30 days", "thirty days"]),
]
ROWS = {
    "isolated, periodic only (question_passages=0)": {"question_passages": 0},
    "stuffed (question_passages=1, mode none)": {"question_passages": 1, "mode": "none"},
    "both (chat default: question_passages=1 + isolated)": {},
    "none": {"mode": "none"},
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "docs"
        corpus.mkdir()
        for name, text in DOCS.items():
            (corpus / name).write_text(text)
        client = connect(Path(tmp) / "db")
        ingest(client, "product", [corpus], "default", embedder=Embedder(), chunk_tokens=64, progress=False)
        retriever = ChromaRetriever("product", client=client)
        results = {}
        for label, options in ROWS.items():
            chat = ChatFlashBack(model="default", retriever=retriever, max_tokens=64, stride=16, **options)
            answers, started = [], time.perf_counter()
            for question, keys in QUESTIONS:
                message = chat.invoke(question)
                text = message.content.strip()
                retrieved = [p["source"] for r in message.response_metadata["retrievals"] for p in r["passages"]]
                asked = message.response_metadata.get("question_retrieval")
                if asked:
                    retrieved = [p["source"] for p in asked["passages"]] + retrieved
                correct = any(k.lower() in text.lower() for k in keys)
                answers.append({"question": question, "answer": text, "correct": correct,
                                "sources": [Path(s).name for s in retrieved if s]})  # fmt: skip
                print(f"[{label}] {'OK ' if correct else 'no '} {question} -> {text[:100]!r}")
            results[label] = {
                "correct": sum(a["correct"] for a in answers),
                "seconds": time.perf_counter() - started,
                "mode": message.response_metadata["mode"],
                "backend": message.response_metadata["backend"],
                "answers": answers,
            }
    out = Path(__file__).parent / "results" / "product_questions.json"
    out.write_text(json.dumps({"command": "python benchmarks/product_questions.py", "rows": results}, indent=2))
    for label, r in results.items():
        print(f"{label:<45} {r['correct']}/5  {r['seconds']:.1f} s  ({r['mode']}, {r['backend']})")


if __name__ == "__main__":
    main()
