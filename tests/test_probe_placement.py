"""Where the probe's actors run (toolkit/probe/placement.py): the plan as a plain function of described
nodes (GPU nodes cannot be had here), and the one description of the machine the tests run on."""
import pytest
import torch

from toolkit.probe.memory import batch_memory_budget, cache_length, kv_bytes, kv_bytes_per_row, prompt_batch_size
from toolkit.probe.placement import (ModelShape, NodeResources, PlacementPlan, describe_probe_plan, gpu_shortage,
                                     local_node, model_shape, plan_placement)
from toolkit.probe.pool import Placement

GIB = 2**30
H100 = 80 * GIB
AUTO = Placement()


@pytest.fixture(scope="module")
def llama8b():
    return model_shape("random:llama-3-8b")  # the published config, parameters counted on the meta device


@pytest.fixture(scope="module")
def llama70b():
    return model_shape("random:llama-3-70b")


def gpu_node(gpus: int = 8, cpus: int = 64, memory: int = H100, **kwargs) -> NodeResources:
    return NodeResources(gpus=gpus, gpu_memory_bytes=memory, cpus=cpus, **kwargs)


def counts(plan: PlacementPlan) -> tuple:
    p = plan.placement
    return p.num_actors, p.gpus_per_actor, p.cpus_per_actor, plan.tensor_parallel


def test_own_engines_take_one_gpu_per_actor_on_every_gpu():
    for engine in ("fast", "reference"):
        plan = plan_placement(AUTO, [gpu_node()], engine)
        assert counts(plan) == (8, 1.0, 8.0, 1) and plan.on_gpu and plan.warning is None
        assert plan.placement.bundle == {"CPU": 8.0, "GPU": 1.0}
    assert counts(plan_placement(AUTO, [gpu_node(cpus=16)], "fast")) == (8, 1.0, 2.0, 1)  # the node's CPUs shared
    assert counts(plan_placement(AUTO, [gpu_node(cpus=4)], "fast")) == (8, 1.0, 1.0, 1)  # at least one each
    two_nodes = plan_placement(AUTO, [gpu_node(), gpu_node(gpus=4, cpus=16)], "fast")
    assert counts(two_nodes) == (12, 1.0, 4.0, 1)  # 16 CPUs / 4 actors on the smaller node
    assert two_nodes.line() == "12 actor(s) x (1 GPU + 4 CPU) each, engine fast, on 2 node(s) with 12 GPU(s)"


def test_cuda_visible_devices_leaves_four_gpus_and_four_actors(llama8b):
    """torch.cuda.device_count() counts what CUDA_VISIBLE_DEVICES leaves (local_node reads it): 4 of 8."""
    node = gpu_node(gpus=4, cuda_visible_devices="4,5,6,7")
    plan = plan_placement(AUTO, [node], "fast")
    assert counts(plan) == (4, 1.0, 8.0, 1)
    lines = describe_probe_plan(plan, "bfloat16", llama8b, 17, 100, 16, "64 items")
    assert "  node this machine: 4 GPU(s) of 80.0 GiB (CUDA_VISIBLE_DEVICES=4,5,6,7), 64 CPU(s)" in lines


def test_vllm_8b_fits_one_gpu_so_tensor_parallel_1_and_eight_actors(llama8b):
    assert (llama8b.parameters, llama8b.heads, llama8b.kv_heads) == (8_030_261_248, 32, 8)
    plan = plan_placement(AUTO, [gpu_node()], "vllm", llama8b)
    assert counts(plan) == (8, 1.0, 8.0, 1)
    assert plan.notes == ("tensor parallel 1: 15.0 GiB of weights, 15.0 GiB per GPU (at most 60% of 80.0 GiB)",)
    # in fp32 the same model needs 29.9 GiB: still one GPU of 80; of a 40 GiB GPU, two
    assert counts(plan_placement(AUTO, [gpu_node()], "vllm", llama8b, dtype="float32"))[3] == 1
    assert counts(plan_placement(AUTO, [gpu_node(memory=40 * GIB)], "vllm", llama8b, dtype="float32")) == (
        4, 2.0, 8.0, 2)


def test_vllm_70b_runs_tensor_parallel_4_on_eight_80gib_gpus(llama70b):
    """70.6B parameters in bf16 are 131 GiB: over 2 GPUs 66 GiB each leaves 14 GiB of an 80 GiB GPU,
    too little for a KV cache of 16 streams per prompt (and over WEIGHTS_FRACTION = 60%); over 4, 33
    GiB each leaves 47 GiB. So TP 4, and 8 GPUs hold 2 such actors."""
    assert llama70b.parameters == 70_553_706_496 and (llama70b.heads, llama70b.kv_heads) == (64, 8)
    plan = plan_placement(AUTO, [gpu_node()], "vllm", llama70b)
    assert counts(plan) == (2, 4.0, 8.0, 4)  # 32 CPUs each would be, clipped to 8
    assert plan.notes == ("tensor parallel 4: 131.4 GiB of weights, 32.9 GiB per GPU (at most 60% of 80.0 GiB)",)
    assert plan.placement.bundle == {"CPU": 8.0, "GPU": 4.0} and gpu_shortage(plan) is None
    # on 4-GPU nodes too: TP never spans nodes
    assert counts(plan_placement(AUTO, [gpu_node(gpus=4, cpus=32)] * 3, "vllm", llama70b)) == (3, 4.0, 8.0, 4)


def test_heads_tensor_parallel_2_cannot_split_keep_one_gpu_and_say_why():
    """9 attention heads (SmolLM2's count) split over no TP size but 1: a model too big for one GPU then
    runs on one anyway, with the note saying vLLM may find no room for its cache."""
    big = ModelShape(parameters=30 * 10**9, heads=9, kv_heads=3)
    plan = plan_placement(AUTO, [gpu_node()], "vllm", big)
    assert counts(plan) == (8, 1.0, 8.0, 1)
    assert plan.notes == ("tensor parallel 1, the largest the heads and a node allow: 55.9 GiB of weights, "
                          "55.9 GiB per GPU, more than 60% of 80.0 GiB (vLLM may find no room for its KV cache)",)
    # heads that split by 2 and not by 4 stop at 2
    assert counts(plan_placement(AUTO, [gpu_node()], "vllm", ModelShape(60 * 10**9, 6, 6)))[3] == 2


def test_zero_gpus_asked_on_a_gpu_node_runs_on_cpu_with_one_warning():
    plan = plan_placement(Placement(gpus_per_actor=0), [gpu_node()], "fast")
    assert counts(plan) == (2, 0.0, 1.0, 1) and not plan.on_gpu
    assert plan.warning == "gpus_per_actor=0: the probe runs on CPU although 8 GPU(s) are visible"
    lines = describe_probe_plan(plan, "float32", ModelShape(10**8, 9, 3), 5, 90, 8, "10 items")
    assert lines[-1] == "  warning: gpus_per_actor=0: the probe runs on CPU although 8 GPU(s) are visible"
    assert plan_placement(Placement(gpus_per_actor=0), [NodeResources(0, None, 2)], "fast").warning is None


def test_no_gpu_two_one_thread_actors(monkeypatch):
    cpu_only = NodeResources(gpus=0, gpu_memory_bytes=None, cpus=2)
    assert counts(plan_placement(AUTO, [cpu_only], "fast")) == (2, 0.0, 1.0, 1)
    assert counts(plan_placement(AUTO, [NodeResources(0, None, 1)], "fast")) == (1, 0.0, 1.0, 1)
    assert counts(plan_placement(AUTO, [NodeResources(0, None, 64)], "vllm")) == (2, 0.0, 1.0, 1)
    here = local_node()  # this machine, as torch sees it
    assert here.gpus == torch.cuda.device_count() and here.name == "this machine"
    if here.gpus == 0:
        assert counts(plan_placement(AUTO, [here], "fast")) == (2 if here.cpus >= 2 else 1, 0.0, 1.0, 1)


def test_counts_the_user_set_are_kept_and_the_others_filled_around_them():
    node = [gpu_node()]
    assert counts(plan_placement(Placement(num_actors=4), node, "fast")) == (4, 1.0, 8.0, 1)
    assert counts(plan_placement(Placement(num_actors=16), node, "fast")) == (16, 0.5, 4.0, 1)  # equal shares
    assert counts(plan_placement(Placement(num_actors=24), node, "fast")) == (24, 1 / 3, 2.0, 1)
    assert counts(plan_placement(Placement(gpus_per_actor=0.5), node, "fast")) == (16, 0.5, 4.0, 1)
    assert counts(plan_placement(Placement(gpus_per_actor=4), node, "vllm")) == (2, 4.0, 8.0, 4)
    assert counts(plan_placement(Placement(cpus_per_actor=2.5), node, "fast")) == (8, 1.0, 2.5, 1)
    assert counts(plan_placement(Placement(2, 3.0, 1.0), node, "fast")) == (2, 1.0, 3.0, 1)
    assert counts(plan_placement(Placement(num_actors=3), [NodeResources(0, None, 2)], "fast")) == (3, 0.0, 1.0, 1)


def test_actors_that_this_machine_cannot_hold_are_refused_naming_the_key_set(llama70b):
    here = [NodeResources(0, None, 2)]
    plan = plan_placement(Placement(num_actors=64, gpus_per_actor=1), here, "fast")
    assert gpu_shortage(plan).line() == ("gpus_per_actor=1: 64 actor(s) need 64 GPU(s), this machine has 0 "
                                         "(ray_address joins a cluster)")
    assert gpu_shortage(plan_placement(Placement(num_actors=5, gpus_per_actor=0.5), [gpu_node(gpus=2)], "fast")
                        ).line().startswith("gpus_per_actor=0.5: 5 actor(s) need 3 GPU(s), this machine has 2")
    tp4 = plan_placement(Placement(num_actors=4), [gpu_node()], "vllm", llama70b)
    assert gpu_shortage(tp4).line().startswith("num_actors=4: 4 actor(s) need 16 GPU(s), this machine has 8")
    import dataclasses

    assert gpu_shortage(dataclasses.replace(plan, local=False)) is None  # a cluster may grow (autoscaler)
    with pytest.raises(ValueError, match="auto counts: resolve it"):
        Placement().bundle


def test_the_dry_run_budget_is_the_engines_budget(llama8b):
    """The batch line of a dry run: an 8B actor on half of an 80 GiB GPU, prompts of 96 tokens + 16."""
    plan = plan_placement(Placement(gpus_per_actor=0.5), [gpu_node()], "fast")
    lines = describe_probe_plan(plan, "bfloat16", llama8b, 17, 96, 16, "64 item(s) in 1 shard(s) of up to 64")
    weights = llama8b.parameters * 2
    budget = batch_memory_budget(0.5, H100, weights)
    prompts = prompt_batch_size(budget, kv_bytes_per_row(llama8b.config, cache_length(112), 2), 17,
                                kept_bytes=kv_bytes(llama8b.config, 96, 2))  # and the prompt's own KV
    assert f"  batch budget per actor: 12.5 GiB ({budget} bytes) of 0.5 x 80.0 GiB less 15.0 GiB of weights: " \
           f"{prompts} prompt(s) x 17 answers per batch for the longest prompt (96 + 16 tokens, cache 128)" in lines
    assert lines[0] == "probe plan: 16 actor(s) x (0.5 GPU + 4 CPU) each, engine fast, on 1 node(s) with 8 GPU(s)"
    assert "  actors: 16, each 0.5 GPU and 4 CPU(s); engine fast, tensor parallel size 1, dtype bfloat16" in lines
    assert "  shards: 64 item(s) in 1 shard(s) of up to 64" in lines


def test_the_plan_says_which_dtype_the_actors_will_resolve_without_deciding_it():
    """The driver describes dtype=auto for the plan; each actor resolves it on its own device."""
    import dataclasses

    from toolkit.models import cpu_has_native_bf16
    from toolkit.probe.placement import planned_dtype

    gpus = plan_placement(AUTO, [gpu_node()], "fast")
    assert planned_dtype("auto", gpus) == (
        "bfloat16", "auto: bfloat16 on GPUs that have it (float32 on older ones), decided by each actor")
    assert planned_dtype("float32", gpus) == ("float32", "float32")  # asked for: what every actor uses
    cpus = plan_placement(AUTO, [NodeResources(gpus=0, gpu_memory_bytes=None, cpus=4)], "fast")
    here = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert planned_dtype("auto", cpus) == (here, f"auto: {here} on this machine's CPU, decided by each actor")
    cluster = dataclasses.replace(cpus, local=False)  # other machines' CPUs: not read from here
    assert planned_dtype("auto", cluster)[1] == ("auto: bfloat16 on CPUs with bf16 instructions, else float32, "
                                                 "decided by each actor on its node")
