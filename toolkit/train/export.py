"""The Hugging Face export of a ZeRO-3 model: each weight gathered from the ranks' partitions, one at
a time, and written by rank 0 into safetensors shards of bounded size, with the index transformers
reads (model.safetensors.index.json). DeepSpeed's own save_16bit_model gathers the whole state dict
on rank 0 first: 140 GB of host memory for a 70B model."""
from __future__ import annotations

import json
import os
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def export_entries(model) -> list[tuple[str, object]]:
    """(state-dict key, tensor) for every tensor the export writes, in state-dict order: the
    parameters (a tied weight once, under the first name the state dict gives it, as save_pretrained
    keeps it) and the persistent buffers."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    seen, entries = set(), []
    for key in model.state_dict(keep_vars=True):
        tensor = params.get(key, buffers.get(key))
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries.append((key, tensor))
    return entries


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def save_partitioned(model, out_dir: Path, write: bool, shard_bytes: int) -> dict:
    """Every rank calls this (each gather is a collective); rank `write` writes the files. Returns the
    weight map (key -> file name), on the writer; the largest shard held in memory is `shard_bytes`
    (or one tensor, if larger)."""
    import deepspeed
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    shard, shard_size, written, placed, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_size
        if write and shard:
            part = out_dir / f".part-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(part), metadata={"format": "pt"})
            written.append((part, list(shard)))
        shard, shard_size = {}, 0

    for key, tensor in export_entries(model):
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            if write:
                size = tensor.numel() * tensor.element_size()
                if shard and shard_size + size > shard_bytes:
                    flush()
                shard[key] = tensor.detach().to("cpu", copy=True).contiguous()
                shard_size += size
                total += size
    flush()
    if not write:
        return {}
    if len(written) == 1:
        os.replace(written[0][0], out_dir / SINGLE_FILE)
        return {key: SINGLE_FILE for key in written[0][1]}
    for number, (part, keys) in enumerate(written, start=1):
        name = shard_name(number, len(written))
        os.replace(part, out_dir / name)
        placed.update({key: name for key in keys})
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": placed},
                                                 indent=2, sort_keys=True) + "\n")
    return placed
