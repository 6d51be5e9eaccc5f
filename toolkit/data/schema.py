"""The one QA item schema every part of the toolkit speaks, and the error type for bad data."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """Bad input data. The message is one line naming the file, the line/row and the field."""

    def __init__(self, path, message: str, line: int | None = None, field_name: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field_name
        where = self.path
        if line is not None:
            where += f":{line}"
        if field_name is not None:
            where += f": field '{field_name}'"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class QAItem:
    """One closed-book fact. `subject` is the entity the question is about (kept disjoint across splits)."""

    id: str
    question: str
    answer: str
    relation: str
    split: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    subject: str = ""

    @property
    def gold_answers(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)

    def to_dict(self) -> dict:
        row = asdict(self)
        row["aliases"] = list(self.aliases)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "QAItem":
        return cls(
            id=str(row["id"]),
            question=row["question"],
            answer=row["answer"],
            relation=row["relation"],
            split=row["split"],
            aliases=tuple(row.get("aliases") or ()),
            subject=row.get("subject") or "",
        )
