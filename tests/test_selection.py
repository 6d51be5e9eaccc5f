"""Selection strategies on constructed category tables: each set is what its definition says."""
from dataclasses import replace as dataclass_replace

import pytest

from toolkit.gradual.selection import (SelectionConfig, SelectionError, baseline_items, one_stage_union_items,
                                       random_same_pool_items, stage1_items, stage2_items, upgraded_items)

H, M, W, U = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
# id: (C0, C1)
TABLE = {
    "h1": (H, H), "h2": (H, M), "h3": (H, H), "h4": (H, H), "h5": (H, H),
    "h6": (H, H), "h7": (H, H), "h8": (H, H), "h9": (H, U), "h10": (H, H),
    "m1": (M, H), "m2": (M, M), "m3": (M, M), "m4": (M, W),
    "w1": (W, M), "w2": (W, H), "w3": (W, W),
    "u1": (U, M), "u2": (U, U), "u3": (U, W), "u4": (U, H), "u5": (U, M),
}
C0 = {i: v[0] for i, v in TABLE.items()}
C1 = {i: v[1] for i, v in TABLE.items()}


def test_stage1_takes_the_configured_categories():
    assert stage1_items(C0, SelectionConfig()) == ["m1", "m2", "m3", "m4"]
    assert stage1_items(C0, SelectionConfig(stage1_categories=(M, W))) == ["m1", "m2", "m3", "m4", "w1", "w2", "w3"]


def test_upgraded_is_weak_or_unknown_before_and_maybe_or_better_after():
    assert upgraded_items(C0, C1, SelectionConfig()) == ["u1", "u4", "u5", "w1", "w2"]
    strict = SelectionConfig(upgraded_to=(H,))
    assert upgraded_items(C0, C1, strict) == ["u4", "w2"]
    from_unknown = SelectionConfig(upgraded_from=(U,))
    assert upgraded_items(C0, C1, from_unknown) == ["u1", "u4", "u5"]


def test_gradual_stage2_is_upgraded_plus_replay_at_the_ratio():
    parts = stage2_items(C0, C1, SelectionConfig(replay_ratio=0.4))
    assert parts["upgraded"] == ["u1", "u4", "u5", "w1", "w2"]
    assert len(parts["replay"]) == 2  # round(0.4 * 5)
    assert all(C0[i] == H for i in parts["replay"])
    # deterministic for a seed; another seed draws other items from the 10 HighlyKnown
    assert stage2_items(C0, C1, SelectionConfig(replay_ratio=0.4))["replay"] == parts["replay"]
    draws = {tuple(stage2_items(C0, C1, SelectionConfig(replay_ratio=0.4, seed=s))["replay"]) for s in range(8)}
    assert len(draws) > 1


def test_random_same_pool_draws_as_many_as_were_upgraded_from_their_source_pool():
    # stage 1 holds the WeaklyKnown items too; upgraded: Weakly/Unknown -> HighlyKnown
    cfg = SelectionConfig(stage1_categories=(M, W), upgraded_to=(H,), replay_ratio=0.5)
    stage1 = stage1_items(C0, cfg)
    parts = stage2_items(C0, C1, cfg)
    assert parts["upgraded"] == ["u4", "w2"] and len(parts["replay"]) == 1
    same = random_same_pool_items(C0, parts, stage1, cfg)
    assert same["replay"] == parts["replay"]
    # the pool: Weakly/Unknown under C0, not in stage 1 (no w*), not replayed: u1-u5, of which 2 drawn
    assert len(same["random (same pool)"]) == 2 and set(same["random (same pool)"]) <= {"u1", "u2", "u3", "u4", "u5"}
    draws = {tuple(random_same_pool_items(C0, parts, stage1, dataclass_replace(cfg, seed=s))["random (same pool)"])
             for s in range(8)}
    assert len(draws) > 1  # seeded: another seed, another draw from the 5
    assert random_same_pool_items(C0, parts, stage1, cfg) == same  # the same seed, the same draw
    # with the default stage 1 (MaybeKnown) every upgraded item comes from a pool of 8: w1-w3, u1-u5
    default = random_same_pool_items(C0, stage2_items(C0, C1, SelectionConfig()), stage1_items(C0, SelectionConfig()),
                                     SelectionConfig())
    assert len(default["random (same pool)"]) == 5
    assert {C0[i] for i in default["random (same pool)"]} <= {W, U}


def test_one_stage_union_is_stage_1_with_every_part_of_stage_2():
    stage1 = stage1_items(C0, SelectionConfig())
    parts = stage2_items(C0, C1, SelectionConfig(replay_ratio=0.4))
    union = one_stage_union_items(stage1, parts)
    assert union == {"stage1": ["m1", "m2", "m3", "m4"], "stage2 upgraded": ["u1", "u4", "u5", "w1", "w2"],
                     "stage2 replay": parts["replay"]}


def test_replay_from_c1_uses_the_stage1_models_categories():
    parts = stage2_items(C0, C1, SelectionConfig(replay_ratio=10, replay_source="c1"))
    assert parts["replay"] == sorted(i for i in C1 if C1[i] == H and i not in parts["upgraded"])
    assert "m1" in parts["replay"] and "h2" not in parts["replay"]


def test_default_ratio_0_2_replays_one_item_for_five_upgraded():
    assert len(stage2_items(C0, C1, SelectionConfig())["replay"]) == 1


def test_ablations():
    no_replay = stage2_items(C0, C1, SelectionConfig(stage2_strategy="no_replay"))
    assert no_replay == {"upgraded": ["u1", "u4", "u5", "w1", "w2"], "remained_maybe": ["m2", "m3"]}
    assert stage2_items(C0, C1, SelectionConfig(stage2_strategy="upgraded_only")) == {
        "upgraded": ["u1", "u4", "u5", "w1", "w2"]}
    remained = stage2_items(C0, C1, SelectionConfig(stage2_strategy="remained_maybe", replay_ratio=0.5))
    assert remained["remained_maybe"] == ["m2", "m3"] and len(remained["replay"]) == 1


def test_baselines():
    cfg = SelectionConfig()
    assert baseline_items("one_stage", C0, cfg) == ["m1", "m2", "m3", "m4"]
    assert baseline_items("natural", C0, cfg) == sorted(C0)
    assert baseline_items("known_only", C0, cfg) == sorted(i for i in C0 if not i.startswith("u"))
    with pytest.raises(SelectionError, match="unknown baseline 'nope'"):
        baseline_items("nope", C0, cfg)


@pytest.mark.parametrize("kwargs,match", [
    ({"stage1_categories": ()}, "'stage1_categories' is empty"),
    ({"upgraded_to": ("Known",)}, "unknown category 'Known'"),
    ({"replay_ratio": -1}, "replay_ratio"),
    ({"replay_source": "c2"}, "replay_source"),
    ({"stage2_strategy": "fancy"}, "unknown stage2_strategy 'fancy'"),
])
def test_bad_selection_settings(kwargs, match):
    with pytest.raises(SelectionError, match=match):
        SelectionConfig(**kwargs)
