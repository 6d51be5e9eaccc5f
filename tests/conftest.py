import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a 512-token byte-level BPE tokenizer, as a HF directory."""
    return tiny.build_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def synthetic_items():
    return tiny.synthetic_items()


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (converted from GGUF once, cached)."""
    from toolkit.models import ModelSpec, load_model

    return load_model(ModelSpec())
