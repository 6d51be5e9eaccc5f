"""How the report and `gradual run`'s headline write numbers: one percentage format, one verdict of
significance (plain functions, no plotting imports)."""
from __future__ import annotations


def missing(x) -> bool:
    """A number that does not exist: None (metrics.json), or NaN / infinity (older metrics.json files)."""
    return x is None or x != x or x in (float("inf"), float("-inf"))


def pct(x, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal ("12.5%", signed "+12.5%"); a missing one as n/a."""
    return "n/a" if missing(x) else f"{x:+.1%}" if signed else f"{x:.1%}"


def significant(stat: dict | None) -> bool | None:
    """Whether an interval ({low, high}) excludes 0: the difference holds at 95%. None: no interval
    (one seed, no items)."""
    if not stat or missing(stat.get("low")) or missing(stat.get("high")):
        return None
    return stat["low"] > 0 or stat["high"] < 0
