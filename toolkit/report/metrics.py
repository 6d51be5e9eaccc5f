"""The numbers the report shows (design.md section 4), as plain functions of category tables and
per-item correctness, so each can be checked by hand on a small case."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from toolkit.probe.slick import CATEGORIES, HIGHLY_KNOWN

Categories = Mapping[str, str]

# Two-sided 95% Student t quantiles for 1..10 degrees of freedom (for means over a few seeds).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def category_counts(categories: Categories) -> dict[str, int]:
    counts = {c: 0 for c in CATEGORIES}
    for c in categories.values():
        counts[c] += 1
    return counts


def transition_matrix(before: Categories, after: Categories) -> dict[str, dict[str, int]]:
    """matrix[a][b] = items in category a before and b after (items present in both tables)."""
    matrix = {a: {b: 0 for b in CATEGORIES} for a in CATEGORIES}
    for item_id, a in before.items():
        if item_id in after:
            matrix[a][after[item_id]] += 1
    return matrix


def knowledge_acquired(after_one_stage: Categories, after_schedule: Categories) -> dict[str, float]:
    """Training items HighlyKnown after the two-stage schedule vs after stage 1 alone (the paper's
    +24%: relative_gain = 0.24)."""
    one = sum(c == HIGHLY_KNOWN for c in after_one_stage.values())
    two = sum(c == HIGHLY_KNOWN for c in after_schedule.values())
    return {"highly_known_one_stage": one, "highly_known_two_stage": two, "gain": two - one,
            "relative_gain": (two - one) / one if one else float("nan")}


def forgetting(base: Categories, after: Categories) -> dict:
    """Items HighlyKnown under the base model that dropped to a lower category."""
    known = [i for i, c in base.items() if c == HIGHLY_KNOWN and i in after]
    dropped_to = {c: 0 for c in CATEGORIES if c != HIGHLY_KNOWN}
    for i in known:
        if after[i] != HIGHLY_KNOWN:
            dropped_to[after[i]] += 1
    dropped = sum(dropped_to.values())
    return {"base_highly_known": len(known), "dropped": dropped,
            "fraction": dropped / len(known) if known else float("nan"), "dropped_to": dropped_to}


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def accuracy(correct: Sequence[bool], resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    n = len(correct)
    low, high = bootstrap_ci([float(c) for c in correct], resamples, seed)
    return {"accuracy": sum(correct) / n if n else float("nan"), "low": low, "high": high, "n": n}


def accuracy_by_category(correct: Mapping[str, bool], base_categories: Categories,
                         resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Overall accuracy and accuracy per base-model category, each with a bootstrap interval."""
    ids = sorted(correct)
    out = {"overall": accuracy([correct[i] for i in ids], resamples, seed)}
    for category in CATEGORIES:
        members = [correct[i] for i in ids if base_categories.get(i) == category]
        out[category] = accuracy(members, resamples, seed)
    return out


def paired_difference(correct_a: Mapping[str, bool], correct_b: Mapping[str, bool],
                      resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """accuracy(a) - accuracy(b) on the same items, with a paired bootstrap interval: the claim
    "a beats b" holds at 95% only when `low` > 0."""
    ids = sorted(set(correct_a) & set(correct_b))
    diffs = [float(correct_a[i]) - float(correct_b[i]) for i in ids]
    low, high = bootstrap_ci(diffs, resamples, seed)
    return {"difference": float(np.mean(diffs)) if diffs else float("nan"), "low": low, "high": high,
            "n": len(ids)}


def mean_over_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean with a t-based 95% interval across seeds (the interval is absent for one seed)."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "seeds": n}
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96 + 2.4 / (n - 1)
    half = t * float(np.std(values, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": n}
