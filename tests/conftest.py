import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import HashRetriever, make_model  # noqa: E402

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
