import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import HashRetriever, make_model, save_tiny_base  # noqa: E402

from flashback_integrations import FlashBackModel  # noqa: E402


@pytest.fixture
def retriever() -> HashRetriever:
    return HashRetriever()


@pytest.fixture(scope="session")
def llama_fb() -> FlashBackModel:
    model, tok = make_model("llama", marks=True)
    return FlashBackModel(model, tok, name="tiny-llama")


@pytest.fixture(scope="session")
def flashback_home(tmp_path_factory):
    """A fresh FLASHBACK_HOME for the tests that load the real default model (converted once per session)."""
    path = tmp_path_factory.mktemp("flashback-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLASHBACK_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory):
    """A tiny base model and a FlashBack adapter trained on it for one step (marks, LoRA, manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flashback_integrations.training.examples import Example
    from flashback_integrations.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("adapter")
    base = save_tiny_base(root / "base")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    ex = [
        Example(f"d{i}", 0, *(torch.randint(5, 200, (n,), generator=gen).tolist() for n in (12, 6, 4)))
        for i in range(4)
    ]
    train(model, tok, ex, root / "adapter", TrainConfig(steps=1, batch_size=4, micro_batch_size=4), progress=False)
    return Path(base), root / "adapter"
