"""The QA loader: every accepted format, and a corpus of malformed inputs whose errors must name the
file, the line/row and the field."""
import json

import pytest

from toolkit.data.loading import load_qa, to_hf_dataset
from toolkit.data.schema import DataError

GOOD = [
    {"id": "a1", "question": "What is the capital of France?", "answer": "Paris", "relation": "capital",
     "split": "train", "aliases": ["Paris, France"]},
    {"id": "a2", "question": "What is the capital of Japan?", "answer": "Tokyo", "relation": "capital",
     "split": "dev"},
    {"id": "a3", "question": "What is the symbol of iron?", "answer": "Fe", "relation": "symbol",
     "split": "test", "subject": "iron"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    items = load_qa(write_jsonl(tmp_path / "qa.jsonl", GOOD))
    assert [it.id for it in items] == ["a1", "a2", "a3"]
    assert items[0].aliases == ("Paris, France",)
    assert items[0].gold_answers == ("Paris", "Paris, France")
    assert items[2].subject == "iron"
    assert load_qa(tmp_path / "qa.jsonl", splits=("dev",))[0].id == "a2"


def test_json_csv_parquet_and_saved_dataset_load_the_same_items(tmp_path):
    expected = load_qa(write_jsonl(tmp_path / "qa.jsonl", GOOD))
    (tmp_path / "qa.json").write_text(json.dumps(GOOD), encoding="utf-8")
    csv_lines = ["id,question,answer,relation,split,aliases,subject"]
    for r in GOOD:
        csv_lines.append(",".join([r["id"], f'"{r["question"]}"', r["answer"], r["relation"], r["split"],
                                   f'"{"|".join(r.get("aliases", []))}"', r.get("subject", "")]))
    (tmp_path / "qa.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    ds = to_hf_dataset(expected)
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("qa.json", "qa.csv", "qa.parquet", "saved"):
        assert load_qa(tmp_path / name) == expected, name


def test_split_directory_takes_split_from_file_name(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in GOOD]
    write_jsonl(tmp_path / "train.jsonl", rows[:2])
    write_jsonl(tmp_path / "validation.jsonl", rows[2:])
    items = load_qa(tmp_path)
    assert [(it.id, it.split) for it in items] == [("a1", "train"), ("a2", "train"), ("a3", "dev")]


def test_saved_dataset_dict_maps_validation_to_dev(tmp_path):
    import datasets

    rows = [{k: v for k, v in r.items() if k not in ("split", "aliases", "subject")} for r in GOOD]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                               "validation": datasets.Dataset.from_list(rows[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [it.split for it in load_qa(tmp_path / "dd")] == ["train", "train", "dev"]


def test_entity_questions_layout(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / split).mkdir()
        records = [{"question": f"Where was person {i} born?", "answers": [f"Town{i}", f"T{i}"]}
                   for i in range(3)]
        (tmp_path / split / f"P19.{split}.json").write_text(json.dumps(records), encoding="utf-8")
    items = load_qa(tmp_path)
    assert len(items) == 6 and {it.relation for it in items} == {"P19"}
    assert items[0].answer == "Town0" and items[0].aliases == ("T0",)
    assert {it.split for it in items} == {"train", "dev"}


# ------------------------------------------------------------------ malformed inputs
# (file name, file content, expected fragments of the one-line message)
MALFORMED = [
    ("bad.jsonl", '{"question": "Q?", "answer": "A", "split": "train"}\n{"question": "Q2?", "answer"\n',
     ["bad.jsonl:2", "malformed JSON"]),
    ("noq.jsonl", '{"answer": "A", "split": "train"}\n', ["noq.jsonl:1", "'question'", "missing"]),
    ("noa.jsonl", '{"id": "x", "question": "Q?", "split": "train"}\n', ["noa.jsonl:1", "'answer'"]),
    ("emptyq.jsonl", '{"question": "  ", "answer": "A", "split": "train"}\n', ["emptyq.jsonl:1", "'question'", "empty"]),
    ("emptya.jsonl", '{"question": "Q?", "answer": "", "split": "train"}\n', ["emptya.jsonl:1", "'answer'", "empty"]),
    ("nullq.jsonl", '{"question": null, "answer": "A", "split": "train"}\n', ["nullq.jsonl:1", "'question'"]),
    ("listq.jsonl", '{"question": ["Q?"], "answer": "A", "split": "train"}\n', ["listq.jsonl:1", "'question'", "string"]),
    ("dup.jsonl", '{"id": "x", "question": "Q?", "answer": "A", "split": "train"}\n\n'
                  '{"id": "x", "question": "Q2?", "answer": "B", "split": "train"}\n',
     ["dup.jsonl:3", "'id'", "duplicate id 'x'", "dup.jsonl:1"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "empty"]),
    ("split.jsonl", '{"question": "Q?", "answer": "A", "split": "training"}\n', ["split.jsonl:1", "'split'", "unknown split 'training'"]),
    ("nosplit.jsonl", '{"question": "Q?", "answer": "A"}\n', ["nosplit.jsonl:1", "'split'"]),
    ("aliases.jsonl", '{"question": "Q?", "answer": "A", "split": "train", "aliases": "B"}\n', ["aliases.jsonl:1", "'aliases'", "list"]),
    ("aliasempty.jsonl", '{"question": "Q?", "answer": "A", "split": "train", "aliases": ["B", ""]}\n', ["aliasempty.jsonl:1", "'aliases'"]),
    ("notobj.jsonl", '["Q?", "A"]\n', ["notobj.jsonl:1", "object"]),
    ("answers.jsonl", '{"question": "Q?", "answers": [], "split": "train"}\n', ["answers.jsonl:1", "'answers'"]),
    ("bad.json", '[{"question": "Q?", "answer": "A", "split": "train"},\n {"question": }]', ["bad.json:2", "malformed JSON"]),
    ("obj.json", '{"question": "Q?"}', ["obj.json", "array"]),
    ("bad.csv", 'question,answer,split\n"Q?",A,train\n"Q2?",B,train,extra\n', ["bad.csv:3", "more cells"]),
    ("short.csv", 'question,answer,split\n"Q?"\n', ["short.csv:2", "fewer cells"]),
    ("noans.csv", 'question,answer,split\n"Q?",A,train\n"Q2?",,train\n', ["noans.csv:3", "'answer'"]),
    ("data.txt", "hello\n", ["data.txt", "unsupported file type"]),
    ("relation.jsonl", '{"question": "Q?", "answer": "A", "split": "train", "relation": 7}\n', ["relation.jsonl:1", "'relation'"]),
]


@pytest.mark.parametrize("name,content,fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_names_file_line_and_field(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_qa(path)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_non_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "Q?", "answer": "A", "split": "train"}\n'
                     b'{"question": "Caf\xe9?", "answer": "A", "split": "train"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_qa(path)


def test_missing_file_and_unknown_requested_split(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_qa(tmp_path / "nope.jsonl")
    write_jsonl(tmp_path / "qa.jsonl", GOOD)
    with pytest.raises(DataError, match="unknown split 'validate'"):
        load_qa(tmp_path / "qa.jsonl", splits=("validate",))
    with pytest.raises(DataError, match="no items in split"):
        load_qa(write_jsonl(tmp_path / "only.jsonl", GOOD[:1]), splits=("test",))


def test_directory_without_data_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no train/dev/test files"):
        load_qa(tmp_path)


def test_corrupt_parquet_is_an_error(tmp_path):
    path = tmp_path / "qa.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="qa.parquet: unreadable Parquet"):
        load_qa(path)
