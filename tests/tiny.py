"""Tiny random models and an in-process tokenizer: no hub, no downloads, milliseconds per forward."""

from __future__ import annotations

import zlib
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from flashback_integrations import Passage, add_mark_tokens

TRAIN_TEXT = (
    """
The json module encodes Python objects as JSON text and decodes JSON text into Python objects.
The http server module serves files over HTTP. Regular expressions match patterns in strings.
A retrieval augmented language model retrieves passages every few tokens and reads them.
FlashBack appends the retrieved passage after the input so the cache of the input is kept.
Numbers like 1, 2, 3, 42 and 2026 appear in text; so do words such as cache, token and model.
"""
    * 4
)

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2", "opt")
# Llama-style tokenizers put BOS in front of every prompt; GPT-2/OPT/Qwen2 style ones do not here.
ADDS_BOS = {"llama": True, "mistral": True, "gemma": True, "gpt2": False, "opt": False, "qwen2": False}


@cache
def _tokenizer_json(add_bos: bool, with_bos: bool) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>"] if with_bos else ["</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    if add_bos and with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok.to_str()


def make_tokenizer(add_bos: bool = True, with_bos: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos, with_bos)),
        bos_token="<s>" if with_bos else None,
        eos_token="</s>",
        pad_token="<pad>",
    )
    return tok


def make_config(arch: str, vocab: int, tok: PreTrainedTokenizerFast, positions: int = 512, head_dim: int | None = None):
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=positions,
        **ids,
    )
    if arch == "llama":  # head_dim: vLLM's CPU attention has kernels for 32 and up, not the default 8
        return LlamaConfig(num_key_value_heads=2, **common, **({"head_dim": head_dim} if head_dim else {}))
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "gemma":
        return GemmaConfig(num_key_value_heads=1, head_dim=8, **common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions, **ids)
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=positions,
            word_embed_proj_dim=32,
            **ids,
        )
    raise ValueError(arch)


def make_model(
    arch: str,
    marks: bool = True,
    seed: int = 0,
    with_bos: bool = True,
    positions: int = 512,
    head_dim: int | None = None,
):
    """A random fp32 model of ``arch`` and its tokenizer, optionally with the marking tokens added."""
    tok = make_tokenizer(add_bos=ADDS_BOS[arch] and with_bos, with_bos=with_bos)
    torch.manual_seed(seed)
    config = make_config(arch, len(tok), tok, positions, head_dim)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # make random logits less flat so greedy choices are well separated
        model.get_output_embeddings().weight.mul_(8.0)
    model.eval()
    if marks:
        add_mark_tokens(model, tok)
        with torch.no_grad():  # fresh rows as a trained adapter would give them, not zeros
            emb = model.get_input_embeddings().weight
            emb[-2:] = torch.randn(2, emb.shape[1]) * emb[:-2].std()
    return model, tok


POOL = [
    "The json module encodes Python objects as JSON text.",
    "HTTP servers answer requests over a socket with headers and a body.",
    "Regular expressions match patterns in strings and can capture groups of characters in the text.",
    "FlashBack appends the passage after the input.",
    "cache token model 42",
    "A retrieval augmented language model retrieves passages every few tokens and reads them, "
    "then goes on generating the answer with the new passage in view of the cache.",
    "Numbers like 2026 appear.",
]


class HashRetriever:
    """Deterministic, query-dependent passages so consecutive retrievals give different blocks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def retrieve(self, query: str, k: int) -> list[Passage]:
        self.calls.append((query, k))
        h = zlib.crc32(query.encode())
        return [Passage(text=POOL[(h + 3 * i) % len(POOL)], id=str((h + 3 * i) % len(POOL))) for i in range(k)]


def make_sentence_transformer(path) -> str:
    """A tiny random sentence-transformers model (32-d) saved at ``path``: 'another embedding model'."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from flashback_integrations.store.embeddings import resolve_embedding_source

    tok = AutoTokenizer.from_pretrained(resolve_embedding_source("default"))
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    raw = f"{path}-bert"
    bert.save_pretrained(raw)
    tok.save_pretrained(raw)
    word = st_models.Transformer(raw, max_seq_length=128)
    SentenceTransformer(modules=[word, st_models.Pooling(32)]).save(str(path))
    return str(path)


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_tiny_chat_model(path, arch: str = "llama", marks: bool = True, positions: int = 512) -> str:
    """A tiny model directory with marks and a chat template, loadable by name like any HF model."""
    model, tok = make_model(arch, marks=marks, positions=positions)
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_base(path, arch: str = "llama", seed: int = 0, head_dim: int | None = None) -> str:
    """A tiny model without marks saved like a hub model, so adapters can be trained and loaded by path."""
    model, tok = make_model(arch, marks=False, seed=seed, head_dim=head_dim)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_chat_model(arch: str = "llama", marks: bool = True):
    """A tiny model with marks and a chat template, in memory."""
    model, tok = make_model(arch, marks=marks)
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


# A tools-capable template in the Hermes/Qwen style (tools in the system turn, calls in <tool_call>
# tags, results in <tool_response> user turns), as Qwen2/2.5 ship it.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<s>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call></s>\n'
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' and tools %}"
    "{%- elif m['role'] == 'tool' %}<s>user\n<tool_response>\n{{ m['content'] }}\n</tool_response></s>\n"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}<s>assistant\n"
    "{% if m['content'] %}{{ m['content'] }}\n{% endif %}"
    "{% for c in m['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}</s>\n"
    "{%- else %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_tiny_tools_model(path, positions: int = 2048) -> str:
    """A tiny Qwen2-style model whose chat template renders tools (no marks: a plain local chat model)."""
    model, tok = make_model("qwen2", marks=False, positions=positions)
    tok.chat_template = TOOLS_CHAT_TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_adapter(base_dir, path, flashback_config, seed: int = 0, activated: bool = False):
    """What the trainer writes, without training: LoRA on q/v and the two mark rows (via PEFT), set to
    non-zero random values; returns the PEFT model (eval mode) and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flashback_integrations import AdapterManifest, FlashBackModel, add_mark_tokens, base_fingerprint, save_adapter

    fb = FlashBackModel.from_pretrained(str(base_dir))
    fingerprint = base_fingerprint(fb.model)
    left, right = add_mark_tokens(fb.model, fb.tokenizer)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [left, right]}
    )
    peft_model = get_peft_model(fb.model, config)
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: non-zero LoRA B and new mark rows
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    manifest = AdapterManifest(
        base_model=str(base_dir),
        base_fingerprint=fingerprint,
        flashback_config=flashback_config.to_dict(),
        mark_token_ids=[left, right],
        extra={"activation": "passage"} if activated else {},
    )
    save_adapter(peft_model, fb.tokenizer, path, manifest)
    return peft_model.eval(), fb.tokenizer


def save_tiny_export(tmp_path_factory, flashback_config, seed: int = 3, head_dim: int | None = None, gguf: bool = True):
    """A tiny base + adapter merged by `flashback export`, with an fp32 GGUF beside it (llama.cpp, servers)."""
    from flashback_integrations.loading.export import export_gguf, export_hf

    base = tmp_path_factory.mktemp("base")
    save_tiny_base(base, seed=seed, head_dim=head_dim)
    adapter = tmp_path_factory.mktemp("adapter")
    save_tiny_adapter(base, adapter, flashback_config, seed=1)
    out = export_hf(str(base), adapter, tmp_path_factory.mktemp("export") / "merged")
    if gguf:
        export_gguf(out, out / "model.gguf", dtype="float32")
    return out


def check_stops_and_streams_like_torch(reference, remote, run, prompt: str, config) -> None:
    """A server backend's stop strings and streamed deltas equal the torch backend's (``run(fb, mode, **kw)``)."""
    full = run(reference, "append").text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want, got = run(reference, "append", stop=[stop]), run(remote, "append", stop=[stop])
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    events = remote.stream(prompt, HashRetriever(), config=config, max_new_tokens=9)
    deltas = [e.text for e in events if hasattr(e, "text")]
    assert "".join(deltas) == remote.generate(prompt, HashRetriever(), config=config, max_new_tokens=9).text
