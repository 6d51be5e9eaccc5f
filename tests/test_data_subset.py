"""Capped, relation-balanced subsets: the pipeline's data caps and `gradual data subset`."""
from toolkit.cli import main
from toolkit.data.loading import load_qa
from toolkit.data.subset import balanced_subset, write_subset
from toolkit.io import write_jsonl
from tests import tiny

ITEMS = tiny.synthetic_items(per_relation=16)  # 3 relations: 24 train, 12 dev, 12 test


def test_balanced_subset_covers_every_relation_and_depends_on_the_seed():
    train = [it for it in ITEMS if it.split == "train"]
    subset = balanced_subset(train, 9, seed=0)
    assert len(subset) == 9 and {it.relation for it in subset} == {"color", "home", "code"}
    assert balanced_subset(train, 9, seed=0) == subset and balanced_subset(train, 9, seed=1) != subset
    assert balanced_subset(train, None, seed=0) == sorted(train, key=lambda it: it.id)


def test_subset_command_caps_each_split(tmp_path, capsys):
    write_jsonl(tmp_path / "all.jsonl", [it.to_dict() for it in ITEMS])
    assert main(["data", "subset", str(tmp_path / "all.jsonl"), "--out", str(tmp_path / "sub"),
                 "--train-items", "6", "--dev-items", "3"]) == 0
    items = load_qa(tmp_path / "sub")
    assert [sum(it.split == s for it in items) for s in ("train", "dev", "test")] == [6, 3, 12]
    assert "train 6, dev 3, test 12" in capsys.readouterr().out


def test_subset_command_rejects_a_zero_cap(tmp_path, capsys):
    write_jsonl(tmp_path / "all.jsonl", [it.to_dict() for it in ITEMS])
    assert main(["data", "subset", str(tmp_path / "all.jsonl"), "--out", str(tmp_path / "sub"),
                 "--test-items", "0"]) == 2
    assert "--test-items=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "sub").exists()


def test_a_subset_of_chosen_relations_holds_only_them(tmp_path):
    write_jsonl(tmp_path / "all.jsonl", [it.to_dict() for it in ITEMS])
    counts = write_subset(tmp_path / "all.jsonl", tmp_path / "sub", {"train": 6}, relations=("color", "code"))
    items = load_qa(tmp_path / "sub")
    assert {it.relation for it in items} == {"color", "code"} and counts == {"train": 6, "dev": 8, "test": 8}
