"""Did this run reproduce a committed result? And the README's demo table, from a committed metrics.json.

`make demo` ends with `gradual report runs/default --compare 'benchmarks/results/demo-cpu-{dtype}'`:
the committed demo of the precision this run's probes resolved (`dtype auto` picks bf16 or fp32 per
machine, and the two give other answers) is compared with this run on the headline numbers, in one
line. The probe is deterministic on one machine (docs/design.md section 6), so a difference on the
same kind of device points at the install, and on another kind of CPU or GPU it can be the hardware.

Plain functions of metrics.json contents (old and new layouts alike); nothing here runs a model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path


MODELS = ("M0", "M1", "M2")
SHORT = {"HighlyKnown": "HK", "MaybeKnown": "MK", "WeaklyKnown": "WK", "Unknown": "UK"}
DTYPES = ("float32", "bfloat16", "float16")
# A generated table in the docs sits between these lines; the begin line names its kind (demo-table:
# the README's demo; evidence-table: docs/evidence.md's result) and source directory (relative to the
# repository root), so switching the source is editing that one line.
BLOCK_BEGIN = "<!-- {kind}: {source} -->"
BLOCK_END = "<!-- {kind}:end -->"
WHY_HARDWARE = ("another CPU or GPU kind computes other logits (other kernels and instructions), which can flip "
                "near-tied answers and so categories: docs/probing.md, 'What is identical where'")
WHY_INSTALL = ("on the same kind of device the probe gives the same answers, so this is not expected: check the "
               "install (`gradual doctor`: versions against the lock)")


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run `gradual run` first)")
    return json.loads(path.read_text(encoding="utf-8"))


def resolved_dtype(metrics: dict) -> str | None:
    """The one dtype a run's probes answered in (metrics.json run -> "probe dtype", e.g. "float32" or
    "bfloat16 (requested auto)"); None where the run does not record it or used two."""
    run = metrics.get("run", {})
    recorded = run.get("probe dtype")
    if recorded is None:  # older runs: only an explicit --dtype in the probe line says it
        match = re.search(r"dtype (\w+)", str(run.get("probe", "")))
        recorded = match[1] if match and match[1] in DTYPES else None
    if recorded is None:
        return None
    resolved = recorded.split(" (", 1)[0].strip()
    return resolved if resolved in DTYPES else None


def _seed_numbers(seed: dict) -> dict[str, str]:
    numbers = {}
    for model in MODELS:
        counts = seed.get("categories", {}).get(f"{model} train")
        if counts:
            numbers[f"{model} train HK/MK/WK/UK"] = "/".join(str(counts.get(c, 0)) for c in SHORT)
    for model in MODELS:
        overall = seed.get("test_accuracy", {}).get(model, {}).get("overall")
        if overall:
            correct = round(overall["accuracy"] * overall["n"])
            numbers[f"{model} test exact match"] = f"{overall['accuracy']:.1%} ({correct} of {overall['n']})"
    selection = seed.get("selection", {})
    for key, name in (("stage1: stage1", "stage-1 items"), ("stage2: upgraded", "stage-2 upgraded items"),
                      ("stage2: replay", "stage-2 replay items")):
        if key in selection:
            numbers[name] = str(selection[key])
    forgetting = seed.get("forgetting", {}).get("M2")
    if forgetting:
        numbers["M2 forgetting"] = f"{forgetting['dropped']} of {forgetting['base_highly_known']}"
    return numbers


def headline_numbers(metrics: dict, name_seeds: bool | None = None) -> dict[str, str]:
    """The numbers a reproduction must match, by readable name: per seed, the train category counts
    of M0, M1, M2, their test exact match, the stage-1 / stage-2 (upgraded, replay) item counts and
    M2's forgetting. Names carry "seed S: " when the run has more than one seed (or `name_seeds`)."""
    seeds = metrics.get("seeds", {})
    name_seeds = len(seeds) > 1 if name_seeds is None else name_seeds
    out = {}
    for seed, values in seeds.items():
        prefix = f"seed {seed}: " if name_seeds else ""
        out.update({prefix + name: value for name, value in _seed_numbers(values).items()})
    return out


def differences(ours: dict, committed: dict) -> list[tuple[str, str | None, str | None]]:
    """(name, ours, committed) for every headline number that differs or that only one run has."""
    name_seeds = max(len(ours.get("seeds", {})), len(committed.get("seeds", {}))) > 1
    a, b = headline_numbers(ours, name_seeds), headline_numbers(committed, name_seeds)
    return [(name, a.get(name), b.get(name)) for name in dict.fromkeys([*b, *a]) if a.get(name) != b.get(name)]


def committed_dir(template: str, dtype: str) -> str:
    """The committed result for `dtype`: `template` with "{dtype}" replaced (no placeholder: as given)."""
    return template.replace("{dtype}", dtype)


def compare_line(run_dir: str | Path, template: str, root: str | Path = ".") -> str:
    """One line: whether the run in `run_dir` reproduced the committed result for its precision
    (`template`, e.g. "benchmarks/results/demo-cpu-{dtype}", relative to `root`), and if not, which
    numbers differ (ours vs committed) and why that can happen."""
    ours = read_metrics(run_dir)
    dtype = resolved_dtype(ours)
    if dtype is None and "{dtype}" in template:
        return ("cannot pick the committed result to compare with: this run's metrics.json does not record one "
                f"probe dtype (run -> probe dtype: {ours.get('run', {}).get('probe dtype', 'missing')})")
    where = committed_dir(template, dtype or "")
    what = f"the committed {dtype} demo ({where})" if dtype else f"the committed result ({where})"
    path = Path(root) / where / "metrics.json"
    if not path.is_file():
        return f"no committed {dtype + ' ' if dtype else ''}demo to compare with: {where}/metrics.json does not exist"
    committed = json.loads(path.read_text(encoding="utf-8"))
    diff = differences(ours, committed)
    if not diff:
        return f"reproduced {what}: {len(headline_numbers(ours))} headline numbers equal"
    shown = "; ".join(f"{name} {a if a is not None else 'missing'} vs {b if b is not None else 'missing'}"
                      for name, a, b in diff)
    our_device = ours.get("run", {}).get("device", "not recorded")
    their_device = committed.get("run", {}).get("device", "not recorded")
    if our_device == their_device and our_device != "not recorded":
        why = f"both ran on {our_device}: {WHY_INSTALL}"
    else:
        why = f"this run ran on {our_device}, the committed one on {their_device}: {WHY_HARDWARE}"
    return f"differs from {what}: {shown} (ours vs committed); {why}"


# ---------------------------------------------------------------- the docs' generated tables


def readme_table(metrics: dict, source: str) -> str:
    """The README's demo table (Markdown, between its marker lines naming `source`) from a
    committed metrics.json: the first seed's category counts and test exact match of M0, M1, M2, the
    stage sizes, forgetting, and the run's precision and device."""
    seed, values = next(iter(metrics["seeds"].items()))
    cats = {m: values["categories"][f"{m} train"] for m in MODELS}
    n_train = sum(cats["M0"].values())
    acc = {m: values["test_accuracy"][m]["overall"] for m in MODELS}
    n_test = acc["M0"]["n"]
    lines = [BLOCK_BEGIN.format(kind="demo-table", source=source),
             f"{_source_line(metrics, source, f'seed {seed}')}:", "",
             "| | M0 (base) | M1 (stage 1) | M2 (stage 2) |", "|---|---|---|---|"]
    for category in SHORT:
        lines.append(f"| {category} train items (of {n_train}) | " + " | ".join(str(cats[m].get(category, 0)) for m in MODELS) + " |")
    lines.append(f"| test exact match (n={n_test}) | " + " | ".join(f"{acc[m]['accuracy']:.1%}" for m in MODELS) + " |")
    selection, forgetting = values.get("selection", {}), values.get("forgetting", {}).get("M2")
    upgraded = selection.get("stage2: upgraded", 0)
    lines += ["", f"Stage 1 trained on {selection.get('stage1: stage1', 'n/a')} items; stage 2 on {upgraded} upgraded "
                  f"+ {selection.get('stage2: replay', 0)} replay items" + (" (nothing upgraded: stage 2 skipped, M2 is M1)"
                                                                         if upgraded == 0 else "") + "."]
    if forgetting:
        lines[-1] += (f" Forgetting: {forgetting['dropped']} of {forgetting['base_highly_known']} base-HighlyKnown "
                      "train items dropped a category after stage 2.")
    lines.append(BLOCK_END.format(kind="demo-table"))
    return "\n".join(lines)


def evidence_table(metrics: dict, source: str) -> str:
    """docs/evidence.md's result (between its marker lines naming `source`) from a committed
    multi-seed metrics.json: the report's headline table, the probe-noise floor per seed, and per seed
    the HighlyKnown train items of M0, M1, M2 and stage 2's size."""
    from .render import group_table, headline_table

    seeds = metrics["seeds"]
    lines = [BLOCK_BEGIN.format(kind="evidence-table", source=source),
             f"{_source_line(metrics, source, 'seeds ' + ', '.join(seeds))}. Each cell: mean over seeds [95% t "
             "interval]; knowledge gain and M2 − model: knowledge as a share of the train items; significant: the "
             "interval excludes 0.", "",
             *headline_table(metrics.get("aggregate_table", []))]
    floors = [m["noise_floor"]["reprobe"] for m in seeds.values() if m.get("noise_floor")]
    if floors:
        lines.append(f"Probe-noise floor (M0 re-probed under another probe seed, no training), seed by seed: the category "
                     f"of {', '.join(str(f['changed']) for f in floors)} of {floors[0]['items']} train items changed; "
                     f"{', '.join(str(f['upgraded']) for f in floors)} were \"upgraded\" by stage 2's rule and "
                     f"{', '.join(str(f['forgotten']) for f in floors)} base-HighlyKnown items \"forgotten\".")
        lines.append("")
    per_seed = []
    for seed, m in seeds.items():
        k, selection = m["knowledge_acquired"]["M2"], m.get("selection", {})
        steps = m.get("training", {}).get("stage2", {}).get("steps", "n/a")
        per_seed.append(f"seed {seed}: {k['highly_known_M0']} -> {k['highly_known_M1']} -> {k['highly_known']} "
                        f"(stage 2: {selection.get('stage2: upgraded', 0)} upgraded + {selection.get('stage2: replay', 0)} "
                        f"replay items, {steps} steps)")
    lines += ["HighlyKnown train items M0 -> M1 -> M2, " + "; ".join(per_seed) + ".", ""]
    summed = summed_groups([m["knowledge_by_group"] for m in seeds.values() if m.get("knowledge_by_group")])
    if summed:
        lines += ["HighlyKnown train items per item set a stage or control trained on, summed over the seeds:", "",
                  *group_table(summed)]
    lines.append(BLOCK_END.format(kind="evidence-table"))
    return "\n".join(lines)


def _source_line(metrics: dict, source: str, seeds: str) -> str:
    """Where a generated table comes from: the file, its seeds, items, probe dtype and device."""
    run = metrics.get("run", {})
    return (f"From `{source}/metrics.json` ({seeds}; items train/dev/test {run.get('items (train/dev/test)', 'not recorded')}; "
            f"probe dtype {run.get('probe dtype', 'not recorded')}; device {run.get('device', 'not recorded')})")


def summed_groups(per_seed: list[dict]) -> dict:
    """knowledge_by_group summed over seeds, the groups and models every seed has."""
    if not per_seed:
        return {}
    return {group: {key: sum(seed[group][key] for seed in per_seed) for key in per_seed[0][group]
                    if all(key in seed.get(group, {}) for seed in per_seed)}
            for group in per_seed[0] if all(group in seed for seed in per_seed)}


TABLES = {"demo-table": readme_table, "evidence-table": evidence_table}


def generated_blocks(text: str) -> list[tuple[str, str, str]]:
    """(kind, source, block) for every generated table in a document's text (the block with its marker lines)."""
    kinds = "|".join(map(re.escape, TABLES))
    begin = re.escape(BLOCK_BEGIN).replace(re.escape("{kind}"), f"(?P<kind>{kinds})").replace(
        re.escape("{source}"), r"(?P<source>[^ ]+)")
    end = re.escape(BLOCK_END).replace(re.escape("{kind}"), "(?P=kind)")
    pattern = begin + ".*?" + end
    return [(m["kind"], m["source"], m[0]) for m in re.finditer(pattern, text, flags=re.S)]


def regenerated(text: str, root: str | Path = ".") -> str:
    """`text` with every generated table rebuilt from the metrics.json its marker names (under `root`)."""
    for kind, source, block in generated_blocks(text):
        text = text.replace(block, TABLES[kind](read_metrics(Path(root) / source), source))
    return text


def update_generated(doc: str | Path, root: str | Path = ".", write: bool = True) -> bool:
    """Whether a generated table of the document `doc` is stale; rebuilt in place unless `write` is off."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")
    new = regenerated(text, root)
    if new != text and write:
        doc.write_text(new, encoding="utf-8")
    return new != text
