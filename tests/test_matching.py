"""Normalisation and exact match (docs/design.md section 2)."""
import pytest

from toolkit.data.matching import extract_answer, is_correct, normalize_answer


@pytest.mark.parametrize("raw,expected", [
    ("Paris", "paris"),
    ("  The  Hague ", "hague"),
    ("An apple", "apple"),
    ("a", ""),
    ("U.S.A.", "usa"),
    ("Guinea-Bissau", "guinea bissau"),
    ("Port-au-Prince", "port au prince"),
    ("Côte d’Ivoire", "côte divoire"),
    ("¿Bogotá?", "bogotá"),
    ("Ｔｏｋｙｏ", "tokyo"),           # full-width letters fold under NFKC
    ("theatre", "theatre"),          # articles only as whole words
    ("Washington, D.C.", "washington dc"),
    ("Tab\tand\nnewline", "tab and newline"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_is_correct_uses_aliases_and_normalisation():
    gold = ("United Kingdom", "UK", "Britain")
    assert is_correct("the United Kingdom.", gold)
    assert is_correct("uk", gold)
    assert is_correct(" BRITAIN ", gold)
    assert not is_correct("England", gold)
    assert not is_correct("United", gold)  # exact match, not containment


def test_empty_prediction_never_matches_even_an_article_only_gold():
    assert not is_correct("", ("the",))
    assert not is_correct("The", ("A",))


def test_unicode_accents_are_kept_distinct():
    # Exact match keeps accents: an alias must list the unaccented spelling.
    assert not is_correct("Bogota", ("Bogotá",))
    assert is_correct("Bogota", ("Bogotá", "Bogota"))


def test_extract_answer_stops_at_first_newline():
    assert extract_answer(" Paris\n\nQ: next") == "Paris"
    assert extract_answer("Tokyo") == "Tokyo"
    assert extract_answer("\nParis") == ""
