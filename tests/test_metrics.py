"""Metrics computed by hand on small constructed cases."""
import math

from toolkit.report.metrics import (accuracy, accuracy_by_category, bootstrap_ci, category_counts,
                                    forgetting, knowledge_acquired, mean_over_seeds, paired_difference,
                                    transition_matrix)

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


def test_knowledge_acquired_is_the_relative_gain_in_highly_known():
    k = knowledge_acquired(C1, C2)
    assert (k["highly_known_one_stage"], k["highly_known_two_stage"], k["gain"]) == (2, 5, 3)
    assert k["relative_gain"] == 1.5
    assert math.isnan(knowledge_acquired({"x": U}, {"x": H})["relative_gain"])


def test_forgetting_counts_base_highly_known_that_dropped():
    f = forgetting(C0, C1)
    assert f["base_highly_known"] == 2 and f["dropped"] == 1 and f["fraction"] == 0.5
    assert f["dropped_to"] == {M: 1, W: 0, U: 0}
    assert forgetting(C0, C2)["dropped"] == 0


def test_accuracy_and_bootstrap_interval():
    acc = accuracy([True, True, False, True])
    assert acc["accuracy"] == 0.75 and acc["n"] == 4
    assert 0 <= acc["low"] <= 0.75 <= acc["high"] <= 1
    low, high = bootstrap_ci([1.0] * 10)
    assert low == high == 1.0
    wide = accuracy([True, False] * 5)
    narrow = accuracy([True, False] * 500)
    assert (wide["high"] - wide["low"]) > 3 * (narrow["high"] - narrow["low"])


def test_accuracy_by_base_category():
    correct = {"a": True, "b": True, "c": False, "d": True, "e": False, "f": False}
    acc = accuracy_by_category(correct, C0)
    assert acc["overall"]["accuracy"] == 0.5
    assert acc[H]["accuracy"] == 1.0 and acc[H]["n"] == 2
    assert acc[M]["accuracy"] == 0.0 and acc[W]["accuracy"] == 1.0 and acc[U]["accuracy"] == 0.0


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
    assert math.isnan(mean_over_seeds([0.5])["low"])
