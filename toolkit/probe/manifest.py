"""A probe's manifest.json (the arguments that fix its results: a re-run must match them) and the
dtype its shards were probed in: "auto" is resolved by each actor on its own device, every row
records what its actor resolved, and one probe's rows come from one dtype."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from toolkit.config import config_fields, to_dict
from toolkit.models import EMBEDDED_MODEL

from .shards import ShardPlan, data_hash
from .slick import ProbeConfigError
from .types import ProbeConfig

MANIFEST_VERSION = 1


def probe_manifest(run, probe: ProbeConfig, plan: ShardPlan, exemplars) -> dict:
    """manifest.json of a probe (`run`: its RunConfig)."""
    # every probe setting (a resumed run must not mix sampling modes), and what fixes the plan
    return dict(version=MANIFEST_VERSION, model=run.model or EMBEDDED_MODEL, data_hash=plan.data_hash,
                exemplar_hash=data_hash(exemplars), split=run.split, exemplar_split=run.exemplar_split,
                **to_dict(probe), shard_size=run.shard_size, limit=run.limit, num_items=plan.num_items,
                num_shards=len(plan.shards))


def check_manifest(out: Path, manifest: dict, plan: ShardPlan) -> str | None:
    """Refuse an output directory that holds a probe run with other arguments (nothing is written);
    the dtype its shards were probed in (None: no shard yet). The dtype requested is not compared: the
    dtypes resolved are (`dtype_mix_error`; a concrete request right here)."""
    path = out / "manifest.json"
    if not path.exists():
        if any((out / "shards").glob("shard-*.jsonl")):
            raise ProbeConfigError(f"{out}/shards holds shard files but there is no manifest.json; "
                                   f"use another --out")
        return None
    old = json.loads(path.read_text(encoding="utf-8"))
    diffs = [f"{k} was {recorded(old, k)!r}, now {v!r}" for k, v in manifest.items()
             if k != "dtype" and recorded(old, k) != v]
    written = written_dtype(out, plan, old["dtype"])
    if written and manifest["dtype"] not in ("auto", written):
        diffs.append(f"dtype was {written!r}, now {manifest['dtype']!r}")
    if diffs:
        raise ProbeConfigError(f"{out} holds a probe run with different arguments: {'; '.join(diffs)} "
                               f"(use another --out, or delete it to start over)")
    return written


def recorded(manifest: dict, key: str):
    """A manifest's value of `key`; a probe setting added after the manifest was written (lazy,
    exemplars) had its default then, so a probe of an older toolkit resumes with the defaults."""
    defaults = {f.name: f.default for f in config_fields(ProbeConfig)}
    return manifest.get(key, defaults.get(key))


def written_dtype(out: Path, plan: ShardPlan, manifest_dtype: str) -> str | None:
    """The dtype the finished shards were probed in: their rows say (a shard is one actor's work, so
    its first row speaks for it); rows of an older toolkit do not, its manifest held the dtype resolved."""
    for shard in plan.shards:
        if shard.path(out).exists():
            with open(shard.path(out), encoding="utf-8") as fh:
                return json.loads(fh.readline()).get("dtype", manifest_dtype)
    return None


def dtype_mix_error(requested: str, actors: list[dict], written: str | None) -> str | None:
    """Why the answers would come from more than one dtype, or None. Each actor resolved `requested`
    on its own device (its info(): `dtype`, `hostname`); `written`: the dtype of the shards on disk."""
    where: dict[str, set[str]] = defaultdict(set)
    for info in actors:
        where[info["dtype"]].add(info["hostname"])
    if written:
        where[written].add("the shards already written")
    if len(where) < 2:
        return None
    said = "; ".join(f"{dtype} on {', '.join(sorted(hosts))}" for dtype, hosts in sorted(where.items()))
    return (f"dtype={requested} resolved to {len(where)} dtypes ({said}); one probe's answers come from one "
            f"dtype: set dtype to one of them")
