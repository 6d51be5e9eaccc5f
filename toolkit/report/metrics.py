"""The numbers the report shows (docs/design.md section 4), as plain functions of category tables and
per-item correctness, so each can be checked by hand on a small case.

A number that does not exist (a rate over zero items, an interval over one seed) is None, never NaN:
metrics.json must parse under any strict JSON reader."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from toolkit.probe.slick import CATEGORIES, HIGHLY_KNOWN

Categories = Mapping[str, str]

# Where an interval may lie: a t interval around a mean can cross these, a proportion cannot.
PROPORTION = (0.0, 1.0)
DIFFERENCE = (-1.0, 1.0)  # a difference of two proportions

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


def knowledge_acquired(base: Categories, after_one_stage: Categories, model: Categories) -> dict:
    """Training items HighlyKnown under the base model M0, the one-stage model M1 and `model` (M2, or
    a baseline), and two readings of "how much more did `model` acquire than M1":
      acquired_gain  = (HK(model) - HK(M0)) / (HK(M1) - HK(M0)) - 1: knowledge acquired in training,
                       the reading of the paper's "+24% knowledge acquired in this stage"; None when
                       M1 acquired nothing (HK(M1) == HK(M0)).
      retained_ratio = HK(model) / HK(M1) - 1: its denominator also holds what M0 already knew, so
                       it shrinks as the base model knows more; None when HK(M1) == 0."""
    hk0, hk1, hk = (sum(highly_known(table).values()) for table in (base, after_one_stage, model))
    acquired_one_stage, acquired = hk1 - hk0, hk - hk0
    return {"highly_known_M0": hk0, "highly_known_M1": hk1, "highly_known": hk,
            "acquired_M1": acquired_one_stage, "acquired": acquired,
            "acquired_gain": acquired / acquired_one_stage - 1 if acquired_one_stage else None,
            "retained_ratio": hk / hk1 - 1 if hk1 else None}


def forgetting(base: Categories, after: Categories) -> dict:
    """Items HighlyKnown under the base model that dropped to a lower category."""
    known = [i for i, c in base.items() if c == HIGHLY_KNOWN and i in after]
    dropped_to = {c: 0 for c in CATEGORIES if c != HIGHLY_KNOWN}
    for i in known:
        if after[i] != HIGHLY_KNOWN:
            dropped_to[after[i]] += 1
    dropped = sum(dropped_to.values())
    return {"base_highly_known": len(known), "dropped": dropped,
            "fraction": dropped / len(known) if known else None, "dropped_to": dropped_to}


def upgraded(base: Categories, after: Categories, from_: Sequence[str], to: Sequence[str]) -> list[str]:
    """Items in a `from_` category under the base model and a `to` category after (stage 2's rule)."""
    return sorted(i for i, c in base.items() if c in from_ and after.get(i) in to)


def noise_floor(base: Categories, reprobe: Categories, models: Mapping[str, Categories],
                from_: Sequence[str], to: Sequence[str]) -> dict:
    """What re-probing alone moves: the base model probed again under another probe seed (`reprobe`)
    "upgrades" and "forgets" items with no training at all. Each model's upgrades (by stage 2's rule)
    and forgetting are set beside that floor; above_floor = the model's count minus the floor's."""
    def moves(table: Categories) -> dict:
        return {"upgraded": len(upgraded(base, table, from_, to)), "forgotten": forgetting(base, table)["dropped"]}

    floor = {**moves(reprobe), "changed": sum(reprobe.get(i) != c for i, c in base.items()), "items": len(base),
             "transitions": transition_matrix(base, reprobe)}
    per_model = {}
    for name, table in models.items():
        m = moves(table)
        per_model[name] = {**m, "upgraded_above_floor": m["upgraded"] - floor["upgraded"],
                           "forgotten_above_floor": m["forgotten"] - floor["forgotten"]}
    return {"reprobe": floor, "models": per_model}


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean (None, None for no values)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion successes/n (95% at z = 1.96); (None, None) for n = 0.
    Unlike a bootstrap of 0/n or n/n, which resamples only zeros (ones) and so has zero width, it
    stays wide on few items: 0/10 gives [0, 0.2775]."""
    if n == 0:
        return None, None
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n (n/n) the lower (upper) bound is exactly 0 (1); rounding would leave it a hair off
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def accuracy(correct: Sequence[bool]) -> dict[str, float]:
    """A plain proportion with its Wilson interval. Intervals in this module: Wilson for every plain
    proportion (accuracy, HighlyKnown fraction), the paired bootstrap for differences of proportions
    on the same items (paired_difference, knowledge_difference), a t interval over seeds."""
    n = len(correct)
    low, high = wilson_interval(sum(correct), n)
    return {"accuracy": sum(correct) / n if n else None, "low": low, "high": high, "n": n}


def accuracy_by_category(correct: Mapping[str, bool], base_categories: Categories) -> dict[str, dict[str, float]]:
    """Overall accuracy and accuracy per base-model category, each with a Wilson interval."""
    ids = sorted(correct)
    out = {"overall": accuracy([correct[i] for i in ids])}
    for category in CATEGORIES:
        members = [correct[i] for i in ids if base_categories.get(i) == category]
        out[category] = accuracy(members)
    return out


def paired_difference(correct_a: Mapping[str, bool], correct_b: Mapping[str, bool],
                      resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """accuracy(a) - accuracy(b) on the same items, with a paired bootstrap interval: the claim
    "a beats b" holds at 95% only when `low` > 0."""
    ids = sorted(set(correct_a) & set(correct_b))
    diffs = [float(correct_a[i]) - float(correct_b[i]) for i in ids]
    low, high = bootstrap_ci(diffs, resamples, seed)
    return {"difference": float(np.mean(diffs)) if diffs else None, "low": low, "high": high,
            "n": len(ids)}


def highly_known(categories: Categories) -> dict[str, bool]:
    return {item_id: c == HIGHLY_KNOWN for item_id, c in categories.items()}


def knowledge(categories: Categories, one_stage: Categories) -> dict:
    """HighlyKnown training items of a model (a proportion, with its Wilson interval), and how many
    more than the one-stage model M1 has: the knowledge a schedule acquired beyond plain fine-tuning."""
    n = len(categories)
    count = sum(highly_known(categories).values())
    gain = count - sum(highly_known(one_stage).values())
    low, high = wilson_interval(count, n)
    return {"highly_known": count, "items": n, "fraction": count / n if n else None, "low": low, "high": high,
            "gain_vs_M1": gain, "gain_fraction_vs_M1": gain / n if n else None}


def highly_known_by_group(groups: Mapping[str, Sequence[str]], tables: Mapping[str, Categories]) -> dict:
    """Each model's HighlyKnown items within each group of train items (the items a stage or a control
    trained on, and the rest): where a model's knowledge gain lies."""
    rest = set(next(iter(tables.values()))).difference(*map(set, groups.values()))
    return {group: {"items": len(ids), **{model: sum(table.get(i) == HIGHLY_KNOWN for i in ids)
                                          for model, table in tables.items()}}
            for group, ids in {**groups, "the rest": sorted(rest)}.items()}


def knowledge_difference(categories_a: Categories, categories_b: Categories,
                         resamples: int = 1000, seed: int = 0) -> dict:
    """HighlyKnown fraction of a minus that of b over the same training items (paired bootstrap)."""
    return paired_difference(highly_known(categories_a), highly_known(categories_b), resamples, seed)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_over_seeds(values: Sequence[float | None], bounds: tuple[float, float] | None = None) -> dict:
    """Mean with a t-based 95% interval across seeds. Seeds without the value (None) are left out;
    with one seed there is no interval (low = high = None). `bounds` clips the interval to where
    the quantity can lie (PROPORTION, DIFFERENCE)."""
    present = [float(v) for v in values if is_number(v)]
    n = len(present)
    mean = float(np.mean(present)) if n else None
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "seeds": n}
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96 + 2.4 / (n - 1)
    half = t * float(np.std(present, ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "low": low, "high": high, "seeds": n}
