"""Metrics computed by hand on small constructed cases."""
import json
import math

import numpy as np
import pytest

from toolkit.io import write_json
from toolkit.report.collect import json_safe, trained_groups
from toolkit.report.metrics import (DIFFERENCE, PROPORTION, accuracy, accuracy_by_category, bootstrap_ci,
                                    category_counts, forgetting, highly_known_by_group, knowledge, knowledge_acquired,
                                    knowledge_difference, mean_over_seeds, noise_floor, paired_difference,
                                    transition_matrix, wilson_interval)

H, M, W, U = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
C0 = {"a": H, "b": H, "c": M, "d": W, "e": U, "f": U}
C1 = {"a": H, "b": M, "c": H, "d": M, "e": U, "f": M}
C2 = {"a": H, "b": H, "c": H, "d": H, "e": W, "f": H}


def test_counts_and_transitions():
    assert category_counts(C0) == {H: 2, M: 1, W: 1, U: 2}
    t = transition_matrix(C0, C1)
    assert t[H] == {H: 1, M: 1, W: 0, U: 0}
    assert t[U] == {H: 0, M: 1, W: 0, U: 1}
    assert sum(sum(row.values()) for row in t.values()) == 6


def test_acquired_gain_and_retained_ratio_by_hand():
    base = {"a": H, "b": H, "c": U, "d": U, "e": U, "f": W, "g": M}  # 2 of 7 HighlyKnown
    one = {"a": H, "b": H, "c": H, "d": H, "e": U, "f": W, "g": M}  # 4: M1 acquired 2
    two = {"a": H, "b": H, "c": H, "d": H, "e": H, "f": H, "g": H}  # 7: acquired 5
    k = knowledge_acquired(base, one, two)
    assert k == {"highly_known_M0": 2, "highly_known_M1": 4, "highly_known": 7, "acquired_M1": 2, "acquired": 5,
                 "acquired_gain": 1.5, "retained_ratio": 0.75}  # 5 / 2 - 1 and 7 / 4 - 1
    # the issue's reading: 180 known before, 220 after one stage, 228 after two: +20% acquired, +3.6% retained
    base = {f"i{n}": H if n < 180 else U for n in range(500)}
    one = {f"i{n}": H if n < 220 else U for n in range(500)}
    two = {f"i{n}": H if n < 228 else U for n in range(500)}
    k = knowledge_acquired(base, one, two)
    assert math.isclose(k["acquired_gain"], 48 / 40 - 1) and math.isclose(k["retained_ratio"], 228 / 220 - 1)
    lost = knowledge_acquired(one, base, two)  # M1 below M0: a negative denominator, the ratio as defined
    assert (lost["acquired_M1"], lost["acquired"], lost["acquired_gain"]) == (-40, 8, 8 / -40 - 1)


def test_acquired_gain_and_retained_ratio_are_null_without_a_denominator():
    k = knowledge_acquired({"x": H, "y": U}, {"x": H, "y": U}, {"x": H, "y": H})  # M1 acquired nothing
    assert k["acquired_gain"] is None and k["retained_ratio"] == 1.0
    k = knowledge_acquired({"x": U}, {"x": U}, {"x": H})  # M1 knows nothing: neither exists
    assert k["acquired_gain"] is None and k["retained_ratio"] is None
    k = knowledge_acquired({"x": H}, {"x": U}, {"x": H})  # M1 forgot the one item M0 knew
    assert k["acquired_gain"] == 0 / -1 - 1 and k["retained_ratio"] is None


def test_forgetting_counts_base_highly_known_that_dropped():
    f = forgetting(C0, C1)
    assert f["base_highly_known"] == 2 and f["dropped"] == 1 and f["fraction"] == 0.5
    assert f["dropped_to"] == {M: 1, W: 0, U: 0}
    assert forgetting(C0, C2)["dropped"] == 0
    assert forgetting({"x": U}, {"x": U})["fraction"] is None  # nothing HighlyKnown to forget


def test_noise_floor_counts_what_re_probing_alone_moves_and_sets_each_model_above_it():
    base = {"a": H, "b": H, "c": M, "d": W, "e": U, "f": U, "g": U}
    reprobe = {"a": H, "b": M, "c": M, "d": M, "e": U, "f": W, "g": U}  # d upgraded, b forgotten, f moved
    m2 = {"a": H, "b": H, "c": H, "d": H, "e": M, "f": H, "g": U}  # d, e, f upgraded; nothing forgotten
    m1 = {"a": M, "b": M, "c": H, "d": U, "e": U, "f": U, "g": U}  # nothing upgraded; a, b forgotten
    floor = noise_floor(base, reprobe, {"M1": m1, "M2": m2}, (W, U), (H, M))
    assert {k: floor["reprobe"][k] for k in ("upgraded", "forgotten", "changed", "items")} == {
        "upgraded": 1, "forgotten": 1, "changed": 3, "items": 7}
    assert floor["reprobe"]["transitions"][W][M] == 1 and floor["reprobe"]["transitions"][U][W] == 1
    assert floor["models"]["M2"] == {"upgraded": 3, "forgotten": 0, "upgraded_above_floor": 2,
                                     "forgotten_above_floor": -1}
    assert floor["models"]["M1"] == {"upgraded": 0, "forgotten": 2, "upgraded_above_floor": -1,
                                     "forgotten_above_floor": 1}
    # the upgrade rule is the run's: from Unknown only, d's move is no upgrade
    assert noise_floor(base, reprobe, {}, (U,), (H, M))["reprobe"]["upgraded"] == 0


def test_wilson_interval_by_hand():
    # z = 1.96, n = 10: scale 1 + 3.8416 / 10 = 1.38416; 0/10: centre = half = 0.19208 / 1.38416 = 0.13877
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 0.2775, abs_tol=5e-5)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and math.isclose(low, 0.7225, abs_tol=5e-5)
    # 5/10: centre 0.5, half 1.96 / 1.38416 * sqrt(0.025 + 0.009604) = 0.26341
    low, high = wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=5e-5) and math.isclose(high, 0.7634, abs_tol=5e-5)
    # 1/4 at z = 1: scale 1.25, centre (0.25 + 0.125) / 1.25 = 0.3, half 0.8 * sqrt(0.046875 + 0.015625) = 0.2
    low, high = wilson_interval(1, 4, z=1.0)
    assert math.isclose(low, 0.1) and math.isclose(high, 0.5)
    assert wilson_interval(0, 0) == (None, None)


def test_accuracy_has_a_wilson_interval_that_stays_wide_at_0_of_n_and_n_of_n():
    acc = accuracy([True, True, False, True])
    assert acc["accuracy"] == 0.75 and acc["n"] == 4
    assert (acc["low"], acc["high"]) == wilson_interval(3, 4)
    none_right = accuracy([False] * 10)  # a bootstrap of ten zeros is [0, 0]
    assert none_right["accuracy"] == 0.0 and none_right["low"] == 0.0
    assert math.isclose(none_right["high"], 0.2775, abs_tol=5e-5)
    all_right = accuracy([True] * 10)
    assert all_right["high"] == 1.0 and math.isclose(all_right["low"], 0.7225, abs_tol=5e-5)
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)  # why: the bootstrap collapses there
    wide = accuracy([True, False] * 5)
    narrow = accuracy([True, False] * 500)
    assert (wide["high"] - wide["low"]) > 3 * (narrow["high"] - narrow["low"])


def test_accuracy_by_base_category():
    correct = {"a": True, "b": True, "c": False, "d": True, "e": False, "f": False}
    acc = accuracy_by_category(correct, C0)
    assert acc["overall"]["accuracy"] == 0.5
    assert acc[H]["accuracy"] == 1.0 and acc[H]["n"] == 2
    assert acc[M]["accuracy"] == 0.0 and acc[W]["accuracy"] == 1.0 and acc[U]["accuracy"] == 0.0
    empty = accuracy_by_category({"a": True}, {"a": H})[U]  # no test item is Unknown
    assert empty == {"accuracy": None, "low": None, "high": None, "n": 0}


def test_paired_difference_interval_excludes_zero_only_for_a_clear_win():
    ids = [f"q{i}" for i in range(200)]
    better = {i: True for i in ids}
    worse = {i: n % 2 == 0 for n, i in enumerate(ids)}
    d = paired_difference(better, worse)
    assert d["difference"] == 0.5 and d["low"] > 0
    same = paired_difference(worse, worse)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0


def test_mean_over_seeds_uses_student_t():
    m = mean_over_seeds([0.4, 0.5, 0.6])
    assert math.isclose(m["mean"], 0.5)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert math.isclose(m["high"] - m["mean"], half, rel_tol=1e-9)
    assert m["seeds"] == 3


def test_t_interval_over_three_seeds_by_hand_and_clipped_to_a_proportion():
    # mean 0.3; sample sd sqrt((0.04 + 0.01 + 0.09) / 2) = sqrt(0.07); t(2 df) = 4.303
    half = 4.303 * math.sqrt(0.07) / math.sqrt(3)  # 0.65729: the raw interval is [-0.357, 0.957]
    raw = mean_over_seeds([0.1, 0.2, 0.6], DIFFERENCE)
    assert math.isclose(raw["mean"], 0.3) and math.isclose(raw["low"], 0.3 - half)
    assert math.isclose(raw["high"], 0.3 + half) and raw["low"] < 0
    accuracy_like = mean_over_seeds([0.1, 0.2, 0.6], PROPORTION)
    assert accuracy_like["low"] == 0.0 and math.isclose(accuracy_like["high"], 0.3 + half)
    wide = mean_over_seeds([0.9, 1.0], PROPORTION)  # t(1 df) = 12.706, sd / sqrt(2) = 0.05: past 1 unclipped
    assert wide["high"] == 1.0 and math.isclose(wide["low"], 0.95 - 12.706 * 0.05)


def test_one_seed_has_no_interval_and_missing_seeds_are_left_out():
    assert mean_over_seeds([0.5], PROPORTION) == {"mean": 0.5, "low": None, "high": None, "seeds": 1}
    assert mean_over_seeds([]) == {"mean": None, "low": None, "high": None, "seeds": 0}
    m = mean_over_seeds([0.4, None, float("nan"), 0.6])  # a metric two of four seeds have
    assert m["seeds"] == 2 and math.isclose(m["mean"], 0.5)
    assert math.isclose(m["high"] - 0.5, 12.706 * math.sqrt(0.02) / math.sqrt(2))


def test_knowledge_counts_highly_known_train_items_beyond_m1():
    # C1 knows a, c (2 of 6); C2 knows a, b, c, d, f (5 of 6)
    low, high = wilson_interval(5, 6)
    assert knowledge(C2, C1) == {"highly_known": 5, "items": 6, "fraction": 5 / 6, "low": low, "high": high,
                                 "gain_vs_M1": 3, "gain_fraction_vs_M1": 0.5}
    assert knowledge({"a": H, "b": H}, C1)["low"] > 0.3  # 2/2 HighlyKnown: still an interval, not [1, 1]
    assert knowledge(C1, C1)["gain_vs_M1"] == 0
    assert knowledge(C0, C1)["gain_fraction_vs_M1"] == 0.0  # 2 HighlyKnown each
    assert knowledge({}, C1)["fraction"] is None


def test_knowledge_difference_pairs_the_highly_known_indicator_per_item():
    # indicators C2 - C1 per item: a 0, b 1, c 0, d 1, e 0, f 1
    d = knowledge_difference(C2, C1)
    assert d["difference"] == 0.5 and d["n"] == 6
    assert 0 <= d["low"] <= 0.5 <= d["high"] <= 1
    ids = [f"t{i}" for i in range(200)]
    all_known = {i: H for i in ids}
    half_known = {i: H if n % 2 else U for n, i in enumerate(ids)}
    clear = knowledge_difference(all_known, half_known)
    assert clear["difference"] == 0.5 and clear["low"] > 0.4
    reverse = knowledge_difference(half_known, all_known)
    assert reverse["difference"] == -0.5 and reverse["high"] < 0
    # only the items both tables hold are paired
    assert knowledge_difference({"a": H, "z": H}, {"a": U, "y": U})["n"] == 1


def test_json_safe_turns_every_non_finite_number_into_null():
    raw = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": np.float64("nan"),
           "e": np.int64(3), "f": (0.5, None), "g": "NaN", "h": True}
    safe = json_safe(raw)
    assert safe == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": 3, "f": [0.5, None],
                    "g": "NaN", "h": True}
    json.dumps(safe, allow_nan=False)  # a strict writer accepts it


def test_write_json_strict_refuses_nan(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")}, strict=True)
    with pytest.raises(ValueError):
        write_json(path, {"x": [float("inf")]}, strict=True)
    assert not path.exists()  # nothing half-written
    write_json(path, {"x": None}, strict=True)
    assert json.loads(path.read_text()) == {"x": None}
    write_json(path, {"x": float("nan")})  # the default stays permissive
    assert "NaN" in path.read_text()


def test_knowledge_by_group_counts_highly_known_items_per_trained_set_once_each():
    items = [f"t{i}" for i in range(8)]
    stages = {"baseline random_same_pool": {"parts": {"random (same pool)": ["t4", "t5"], "replay": ["t0"]}},
              "baseline natural": {"parts": {"natural": items}},
              "stage2": {"parts": {"upgraded": ["t2", "t3"], "replay": ["t0"]}},
              "stage1": {"parts": {"stage1": ["t1", "t2"]}},
              "baseline one_stage_longer": {"parts": {"stage1 (compute-matched)": ["t2", "t1"]}}}
    groups = trained_groups(stages, items)  # stages first; a reused set and the every-item set left out
    assert groups == {"stage1: stage1": ["t1", "t2"], "stage2: replay": ["t0"], "stage2: upgraded": ["t2", "t3"],
                      "baseline random_same_pool: random (same pool)": ["t4", "t5"]}
    m0 = {i: "HighlyKnown" if i in ("t0", "t6") else "Unknown" for i in items}
    m2 = {**m0, "t2": "HighlyKnown", "t3": "HighlyKnown", "t4": "HighlyKnown", "t6": "MaybeKnown"}
    by_group = highly_known_by_group(groups, {"M0": m0, "M2": m2})
    assert by_group["stage2: upgraded"] == {"items": 2, "M0": 0, "M2": 2}
    assert by_group["stage1: stage1"] == {"items": 2, "M0": 0, "M2": 1}  # t2 sits in both groups
    assert by_group["baseline random_same_pool: random (same pool)"] == {"items": 2, "M0": 0, "M2": 1}
    assert by_group["the rest"] == {"items": 2, "M0": 1, "M2": 0}  # t6, t7
