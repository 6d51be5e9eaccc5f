"""Load QA items from local files into the one schema, validating every row.

Accepted inputs:
  * a JSONL, JSON (array of records), CSV or Parquet file;
  * a directory holding `train|dev|test` files in those formats (what `gradual data build-facts` writes);
  * a Hugging Face dataset directory written by `save_to_disk` (Dataset or DatasetDict);
  * the EntityQuestions layout: `<relation>.<split>.json` files (any depth), records with `question`
    and `answers`.

Text formats are parsed here, not by pyarrow, so that an error can name its exact line; Parquet and
`save_to_disk` directories are read through `datasets`. `to_hf_dataset` turns items back into a
`datasets.Dataset` for callers that want the Hugging Face format.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

from .schema import SPLITS, DataError, QAItem

TEXT_FORMATS = (".jsonl", ".json", ".csv")
FORMATS = TEXT_FORMATS + (".parquet",)
SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev"}
DEFAULT_RELATION = "default"
_ENTITY_QUESTIONS_NAME = re.compile(r"^(?P<relation>[^.]+)\.(?P<split>train|dev|test)\.json$")


def load_qa(path, splits: tuple[str, ...] | None = None) -> list[QAItem]:
    """All QA items under `path`, validated; optionally only those in `splits`."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    items = list(_load_any(path))
    _check_unique_ids(items)
    if not items:
        raise DataError(path, "the dataset is empty")
    if splits is not None:
        for split in splits:
            if split not in SPLITS:
                raise DataError(path, f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
        items = [it for _, it in items if it.split in splits]
        if not items:
            raise DataError(path, f"no items in split(s) {', '.join(splits)}")
        return items
    return [it for _, it in items]


def to_hf_dataset(items: list[QAItem]):
    import datasets

    return datasets.Dataset.from_list([it.to_dict() for it in items])


# ---------------------------------------------------------------- locating files


def _load_any(path: Path) -> Iterator[tuple[str, QAItem]]:
    if path.is_file():
        yield from _load_file(path, _split_from_stem(path.stem))
        return
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        yield from _load_saved_dataset(path)
        return
    split_files = [path / f"{name}{ext}" for name in (*SPLITS, *SPLIT_ALIASES) for ext in FORMATS]
    split_files = [f for f in split_files if f.exists()]
    if split_files:
        for f in split_files:
            yield from _load_file(f, _split_from_stem(f.stem))
        return
    eq_files = sorted(f for f in path.rglob("*.json") if _ENTITY_QUESTIONS_NAME.match(f.name))
    if eq_files:
        for f in eq_files:
            yield from _load_entity_questions(f)
        return
    raise DataError(path, "directory holds no train/dev/test files, no saved dataset and no "
                          "EntityQuestions '<relation>.<split>.json' files")


def _split_from_stem(stem: str) -> str | None:
    stem = stem.lower()
    stem = SPLIT_ALIASES.get(stem, stem)
    return stem if stem in SPLITS else None


# ---------------------------------------------------------------- parsing


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})",
                        line=line) from None


def _load_file(path: Path, default_split: str | None) -> Iterator[tuple[str, QAItem]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(path, f"unsupported file type '{suffix}' (expected one of {', '.join(FORMATS)})")
    for line, row in rows:
        yield f"{path}:{line}", _validate_row(row, path, line, default_split, DEFAULT_RELATION, path.stem)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    for lineno, text in enumerate(_read_utf8(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"malformed JSON: {err.msg} (column {err.colno})", line=lineno) from None


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    text = _read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"malformed JSON: {err.msg} (column {err.colno})", line=err.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, "a JSON file must hold an array of records (or {\"data\": [...]})")
    # JSON arrays have no per-record line numbers: errors name the record index (1-based) as the "line".
    yield from enumerate(data, start=1)


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    if reader.fieldnames is None:
        return
    start = reader.line_num + 1
    for row in reader:
        if None in row:
            raise DataError(path, "more cells than header columns", line=start)
        if any(v is None for v in row.values()):
            raise DataError(path, "fewer cells than header columns", line=start)
        if "aliases" in row:
            text = row["aliases"].strip()
            row["aliases"] = [a.strip() for a in text.split("|") if a.strip()] if text else []
        yield start, {k: (v if v != "" else None) for k, v in row.items()}
        start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"unreadable Parquet file ({type(err).__name__}: {err})") from None
    yield from enumerate(ds, start=1)


def _load_saved_dataset(path: Path) -> Iterator[tuple[str, QAItem]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(path, f"unreadable saved dataset ({type(err).__name__}: {err})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split_name, ds in parts:
        where = path / split_name if split_name else path
        default_split = _split_from_stem(split_name) if split_name else None
        if split_name and default_split is None:
            raise DataError(where, f"unknown split '{split_name}' (expected one of {', '.join(SPLITS)})")
        for row_no, row in enumerate(ds, start=1):
            item = _validate_row(row, where, row_no, default_split, DEFAULT_RELATION, path.name)
            yield f"{where}:{row_no}", item


def _load_entity_questions(path: Path) -> Iterator[tuple[str, QAItem]]:
    match = _ENTITY_QUESTIONS_NAME.match(path.name)
    relation, split = match["relation"], match["split"]
    for row_no, row in _json_rows(path):
        item = _validate_row(row, path, row_no, split, relation, f"{relation}-{split}")
        yield f"{path}:{row_no}", item


# ---------------------------------------------------------------- validation


def _text_field(row: dict, name: str, path: Path, line: int, required: bool) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(path, "missing or null", line=line, field_name=name)
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("id", "answer"):
        value = str(value)  # numeric ids and answers ("1969") are common in CSVs and JSON
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line=line, field_name=name)
    if required and not value.strip():
        raise DataError(path, "empty", line=line, field_name=name)
    return value.strip()


def _string_list(value, path: Path, line: int, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise DataError(path, f"expected a list of strings, got {type(value).__name__}",
                        line=line, field_name=name)
    out = []
    for v in value:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise DataError(path, "every entry must be a non-empty string", line=line, field_name=name)
        out.append(v.strip())
    return out


def _validate_row(row, path: Path, line: int, default_split: str | None, default_relation: str,
                  id_prefix: str) -> QAItem:
    if not isinstance(row, dict):
        raise DataError(path, f"a record must be an object, got {type(row).__name__}", line=line)
    question = _text_field(row, "question", path, line, required=True)
    if row.get("answer") is not None or "answers" not in row:
        answer = _text_field(row, "answer", path, line, required=True)
        aliases = _string_list(row.get("aliases"), path, line, "aliases")
    else:
        answers = _string_list(row.get("answers"), path, line, "answers")
        if not answers:
            raise DataError(path, "no answer given", line=line, field_name="answers")
        answer, aliases = answers[0], answers[1:] + _string_list(row.get("aliases"), path, line, "aliases")
    split_value = _text_field(row, "split", path, line, required=False)
    if split_value is None:
        if default_split is None:
            raise DataError(path, "missing, and the file name is not train/dev/test", line=line,
                            field_name="split")
        split = default_split
    else:
        split = SPLIT_ALIASES.get(split_value.lower(), split_value.lower())
        if split not in SPLITS:
            raise DataError(path, f"unknown split '{split_value}' (expected one of {', '.join(SPLITS)})",
                            line=line, field_name="split")
    relation = _text_field(row, "relation", path, line, required=False) or default_relation
    item_id = _text_field(row, "id", path, line, required=False) or f"{id_prefix}-{line}"
    subject = _text_field(row, "subject", path, line, required=False) or ""
    aliases = tuple(dict.fromkeys(a for a in aliases if a != answer))
    return QAItem(id=item_id, question=question, answer=answer, relation=relation, split=split,
                  aliases=aliases, subject=subject)


def _check_unique_ids(located: list[tuple[str, QAItem]]) -> None:
    first_seen: dict[str, str] = {}
    for where, item in located:
        if item.id in first_seen:
            path, _, line = where.rpartition(":")
            raise DataError(path, f"duplicate id '{item.id}' (first at {first_seen[item.id]})",
                            line=int(line), field_name="id")
        first_seen[item.id] = where
