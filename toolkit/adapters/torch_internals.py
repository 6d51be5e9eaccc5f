"""torch internals the toolkit uses (torch 2.13), each because no public API does the job.

* The timeout of process groups created without one. DeepSpeed 0.19 creates its own groups (its
  copy of the world group, which ZeRO reduces over) with `torch.distributed.new_group(ranks)` and no
  timeout (deepspeed/comm/torch.py new_group; deepspeed.initialize takes none either), and torch gives
  such a group `_get_default_timeout(backend)`, read from c10d's module defaults (NCCL: 10 min,
  gloo: 30 min). Overwriting those defaults is the only way to reach DeepSpeed's groups; the default
  group itself gets the public `init_distributed(timeout=...)` argument.
* A group's timeout, read back (tests): torch has no public getter.
* `torch._dynamo.mark_static_address`: tells CUDA graphs that a cache view keeps its address
  (transformers' StaticCache calls it on the buffers it allocates; the fast engine's row views too).
"""
from __future__ import annotations

from datetime import timedelta

from . import AdapterCheck, installed_version

LIBRARY = "torch"
DEFAULT_TIMEOUTS = ("default_pg_timeout", "default_pg_nccl_timeout")


def set_default_group_timeout(timeout: timedelta) -> None:
    """The timeout of every process group created later without one (gloo and NCCL)."""
    import torch.distributed.distributed_c10d as c10d

    for name in DEFAULT_TIMEOUTS:
        setattr(c10d, name, timeout)


def group_timeout(group, device) -> timedelta:
    """The timeout of `group`'s backend on `device` (torch.device("cpu"): gloo)."""
    return group._get_backend(device).options._timeout


def keep_address_static(tensor) -> None:
    """Tell torch.compile's CUDA graphs that `tensor` keeps its address across calls."""
    import torch

    torch._dynamo.mark_static_address(tensor)


def _default_timeout_moved() -> str | None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if not all(hasattr(c10d, name) for name in DEFAULT_TIMEOUTS):
        return "torch.distributed.distributed_c10d.default_pg_timeout / default_pg_nccl_timeout"
    saved = [getattr(c10d, name) for name in DEFAULT_TIMEOUTS]
    probe = timedelta(minutes=7, seconds=13)
    try:
        set_default_group_timeout(probe)
        seen = [c10d._get_default_timeout(dist.Backend(b)) for b in ("gloo", "nccl")]
    except AttributeError:
        return "torch.distributed.distributed_c10d._get_default_timeout"
    finally:
        for name, value in zip(DEFAULT_TIMEOUTS, saved):
            setattr(c10d, name, value)
    if seen != [probe, probe]:
        return "new groups no longer take c10d's default_pg_timeout / default_pg_nccl_timeout"
    return None


def _group_timeout_moved() -> str | None:
    import torch.distributed as dist

    if not hasattr(dist.ProcessGroup, "_get_backend"):
        return "torch.distributed.ProcessGroup._get_backend"
    timeout = timedelta(seconds=123)
    try:
        backend = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timeout)  # a world of one: no network
        if backend.options._timeout == timeout:
            return None
    except AttributeError:
        pass
    return "a backend's options._timeout"


def _static_address_moved() -> str | None:
    import torch

    try:
        torch._dynamo.mark_static_address(torch.zeros(2))
    except AttributeError:
        return "torch._dynamo.mark_static_address"
    return None


def check() -> AdapterCheck:
    version = installed_version(LIBRARY)
    if version is None:
        return AdapterCheck(LIBRARY, None)
    moved = [m for m in (_default_timeout_moved(), _group_timeout_moved(), _static_address_moved()) if m]
    return AdapterCheck(LIBRARY, version, tuple(moved))
