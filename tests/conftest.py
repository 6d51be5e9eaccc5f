import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only when selected with `-m gpu` on a machine with a GPU: a plain
    `pytest` never starts one by accident, on a GPU machine either."""
    selected = "gpu" in (config.getoption("markexpr") or "")
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    if not selected:
        reason = "needs a GPU: run with `-m gpu` on a GPU machine"
    else:
        import torch

        if torch.cuda.is_available():
            return
        reason = "selected with -m gpu, but no GPU is visible here"
    for item in gpu_tests:
        item.add_marker(pytest.mark.skip(reason=reason))


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
