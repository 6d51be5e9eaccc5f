"""`gradual report RUN_DIR`: metrics.json -> report/ with PNG figures, report.md and a self-contained
report.html (figures embedded), both written atomically.

metrics.json (toolkit/report/collect.py; strict JSON: a number that does not exist is null) holds
  run               {setting: value}
  intervals         {"proportion": "Wilson", ...}   the interval each kind of number carries (absent in
                    older files, whose proportions carry a bootstrap interval)
  seeds             {seed: per-seed metrics, below}
  aggregate         {readable name: {mean, low, high, seeds}}   means over seeds, 95% Student t
  aggregate_table   [{model, knowledge_gain, test_accuracy, forgetting, vs_M2_knowledge, vs_M2_test}]

Per seed:
  categories        {probe: {category: count}}      "M0 train", "M1 train", "M2 train", "M0 test",
                                                    "<baseline> train" for each probed baseline
  per_relation      {relation: {category: fraction}}      base model on train
  transitions       {"C0 -> C1": matrix, ...}             matrix[before][after] = count
  knowledge_acquired  {model: {highly_known_M0, highly_known_M1, highly_known, acquired_M1, acquired,
                     acquired_gain, retained_ratio}}   M2 and each baseline with a train probe, vs M1
                    (metrics.knowledge_acquired); older files: one flat {highly_known_one_stage,
                    highly_known_two_stage, gain, relative_gain} for M2, relative_gain = retained_ratio
  knowledge         {model: {highly_known, items, fraction, low, high, gain_vs_M1, gain_fraction_vs_M1}}
                    for M1, M2 and each baseline with a train probe: its HighlyKnown train items, and
                    how many more than the one-stage model M1 (the knowledge the schedule acquired)
  forgetting        {model: {base_highly_known, dropped, fraction, dropped_to}}   vs the base model
  test_accuracy     {model: {"overall" | category: {accuracy, low, high, n}}}  95% Wilson interval
  comparisons       {"M2 vs M1 (two stages vs one)" | "M1 vs M0" | "M2 vs <baseline>":
                     {difference, low, high, n}}   test accuracy, paired bootstrap over test items
  item_comparisons  {"M2 vs M1" | "M2 vs <baseline>": {difference, low, high, n}}   the HighlyKnown
                    indicator on the same train items, paired bootstrap over items
  fit_speed         {stage: [{epoch, accuracy_by_category}]}   train exact match per epoch
  selection         {set name: size}
  training          {stage: {steps, exported_step, best_dev_accuracy, skipped}}   exported_step: the
                    optimizer step whose weights the stage exported (its best dev step)
  noise_floor       (runs with noise_floor on) {"reprobe": {upgraded, forgotten, changed, items,
                    transitions}, "models": {model: {upgraded, forgotten, upgraded_above_floor,
                    forgotten_above_floor}}}   M0 re-probed under another probe seed (metrics.noise_floor)
  knowledge_by_group {group: {items, model: HighlyKnown count}}   per item set a stage or control
                    trained on ("stage2: upgraded", ...) and "the rest", for M0, M1, M2 and the baselines
  costs             {"steps": {step: seconds}, "probe": {name: {...}}, "train": {name: {...}}}

aggregate_table has one row per model (M1, M2, then the baselines in the order they first ran);
each of its numbers is {mean, low, high, seeds} over the seeds that have it, or null where no
seed has it (M2's own vs_M2_* columns; a baseline without a train probe has no knowledge_gain or
forgetting):
  knowledge_gain    gain_fraction_vs_M1 (difference of proportions: interval clipped to [-1, 1])
  test_accuracy     overall test accuracy (a proportion: interval clipped to [0, 1])
  forgetting        fraction of base-model HighlyKnown items dropped (clipped to [0, 1])
  vs_M2_knowledge   M2 minus this model: HighlyKnown train fraction (item_comparisons)
  vs_M2_test        M2 minus this model: test accuracy (comparisons)
  acquired_gain     (HK - HK(M0)) / (HK(M1) - HK(M0)) - 1 (knowledge_acquired; absent in older files)
  retained_ratio    HK / HK(M1) - 1 (knowledge_acquired; absent in older files)
  upgraded_above_floor  the model's upgraded train items minus the noise floor's (null without it)
With one seed low and high are null (no t interval): the report prints "n/a (1 seed)". `aggregate`
holds the same numbers under readable names ("test accuracy M2", "M2 minus natural: test accuracy")
(older files: plus the mean relative gain of M2 over M1, today's retained ratio). Older metrics.json
files may hold NaN: read as missing.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from toolkit.io import read_jsonl, write_text
from toolkit.probe.slick import CATEGORIES

from . import plots
from .format import missing, pct, significant


# Which of the two readings of "knowledge acquired" the paper's number is set against, and why.
PAPER_COMPARISON = ("The paper's +24% (\"increases the amount of knowledge acquired by the model in this "
                    "stage\") is compared with the acquired gain, (HK − HK(M0)) / (HK(M1) − HK(M0)) − 1: the "
                    "paper speaks of knowledge acquired in the stage, while the retained ratio's denominator "
                    "HK(M1) also holds what the base model M0 already knew, which shrinks it.")


class ReportError(ValueError):
    """A run directory without the metrics a report needs."""


def _fixed(x) -> str:
    return "n/a" if missing(x) else f"{x:.4f}"


def _interval(stat: dict, fmt=pct) -> str:
    """The interval of a mean over seeds or of a bootstrap; one seed has none."""
    if missing(stat.get("low")) or missing(stat.get("high")):
        return "n/a (1 seed)" if stat.get("seeds") == 1 else "n/a"
    return f"[{fmt(stat['low'])}, {fmt(stat['high'])}]"


def _significant(stat: dict | None) -> str:
    verdict = significant(stat)
    return "n/a" if verdict is None else "yes" if verdict else "no"


def _mean_cell(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    interval = _interval(stat)
    return f"{pct(stat['mean'])} {interval if interval.startswith('[') else f'[{interval}]'}"


def _signed_mean_cell(stat: dict | None) -> str:
    """A mean over seeds of a signed ratio (acquired gain, retained ratio), with its interval."""
    if stat is None:
        return "n/a"
    if missing(stat.get("low")) or missing(stat.get("high")):
        return f"{pct(stat['mean'], True)} [{_interval(stat)}]"
    return f"{pct(stat['mean'], True)} [{pct(stat['low'], True)}, {pct(stat['high'], True)}]"


def _count_cell(stat: dict | None) -> str:
    """A mean over seeds of a signed count of items (upgrades above the noise floor)."""
    if stat is None:
        return "n/a"
    interval = _interval(stat, lambda x: f"{x:+.1f}")
    return f"{stat['mean']:+.1f} {interval if interval.startswith('[') else f'[{interval}]'}"


def _acc_cell(acc: dict) -> str:
    if not acc.get("n"):
        return "–"
    return f"{pct(acc['accuracy'])} [{pct(acc['low'])}, {pct(acc['high'])}] (n={acc['n']})"


def _fraction_cell(k: dict) -> str:
    """A HighlyKnown fraction with its Wilson interval (older metrics.json files have none)."""
    if missing(k.get("low")) or missing(k.get("high")):
        return pct(k["fraction"])
    return f"{pct(k['fraction'])} [{pct(k['low'])}, {pct(k['high'])}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _knowledge_acquired(acquired: dict) -> tuple[list[str], dict]:
    """The section's lines and the dict the figure draws (M2's numbers)."""
    if "relative_gain" in acquired:  # a metrics.json from before acquired_gain: M2 vs M1 only
        k = acquired
        return [f"HighlyKnown training items: {k['highly_known_one_stage']} after one stage, "
                f"{k['highly_known_two_stage']} after two stages ({k['gain']:+d}, "
                f"relative gain {pct(k['relative_gain'])}; the paper reports +24%).", ""], k
    lines = ["HighlyKnown (HK) training items under the base model M0, the one-stage model M1 and each model; "
             "acquired: HK − HK(M0).", "", PAPER_COMPARISON, ""]
    lines += _table(["model", "HK(M0)", "HK(M1)", "HK", "acquired (M1)", "acquired", "acquired gain",
                     "retained ratio"],
                    [[model, k["highly_known_M0"], k["highly_known_M1"], k["highly_known"], f"{k['acquired_M1']:+d}",
                      f"{k['acquired']:+d}", pct(k["acquired_gain"], True), pct(k["retained_ratio"], True)]
                     for model, k in acquired.items()])
    return lines, acquired.get("M2", {})


def _seed_sections(seed: str, m: dict, fig_dir: Path, proportion_interval: str) -> tuple[list[str], list[Path]]:
    lines, figures = [f"## Seed {seed}", ""], []

    def figure(path: Path | None, caption: str):
        if path is not None:
            figures.append(path)
            lines.extend([f"![{caption}]({path.parent.name}/{path.name})", ""])

    if m.get("categories"):
        lines += ["### Knowledge categories (SliCK, per probe)", ""]
        lines += _table(["probe", *CATEGORIES, "total"],
                        [[name, *(counts.get(c, 0) for c in CATEGORIES), sum(counts.values())]
                         for name, counts in m["categories"].items()])
    figure(plots.category_distribution(m.get("per_relation", {}), fig_dir / f"categories-seed{seed}.png"),
           "category distribution per relation")
    for name, matrix in m.get("transitions", {}).items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        figure(plots.transition_heatmap(matrix, f"Category transitions {name}",
                                        fig_dir / f"transitions-{slug}-seed{seed}.png"), f"transitions {name}")
    if m.get("test_accuracy"):
        lines += [f"### Test accuracy (exact match, per base-model category, 95% {proportion_interval} interval)", ""]
        lines += _table(["model", "overall", *CATEGORIES],
                        [[model, *(_acc_cell(acc[g]) for g in ["overall", *CATEGORIES])]
                         for model, acc in m["test_accuracy"].items()])
        figure(plots.accuracy_by_category(m["test_accuracy"], fig_dir / f"accuracy-seed{seed}.png"),
               "test accuracy per category")
    if m.get("comparisons"):
        lines += ["### Paired comparisons on test (accuracy difference, 95% paired bootstrap)", ""]
        lines += _table(["comparison", "difference", "interval", "significant"],
                        [[name, pct(d["difference"]), _interval(d), _significant(d)]
                         for name, d in m["comparisons"].items()])
    if m.get("knowledge_acquired"):
        section, k = _knowledge_acquired(m["knowledge_acquired"])
        lines += ["### Knowledge acquired", "", *section]
        figure(plots.knowledge_acquired(k, fig_dir / f"knowledge-seed{seed}.png"), "knowledge acquired")
    if m.get("knowledge"):
        lines += ["### HighlyKnown training items per model (gain vs the one-stage model M1)", ""]
        lines += _table(["model", "HighlyKnown", "items", "fraction", "gain vs M1", "gain (fraction of items)"],
                        [[model, k["highly_known"], k["items"], _fraction_cell(k), f"{k['gain_vs_M1']:+d}",
                          pct(k["gain_fraction_vs_M1"])] for model, k in m["knowledge"].items()])
    if m.get("item_comparisons"):
        lines += ["### Paired comparisons on train (HighlyKnown fraction difference, 95% paired bootstrap)", ""]
        lines += _table(["comparison", "difference", "interval", "significant", "items"],
                        [[name, pct(d["difference"]), _interval(d), _significant(d), d["n"]]
                         for name, d in m["item_comparisons"].items()])
    if m.get("knowledge_by_group"):
        lines += ["### HighlyKnown train items per trained group (where the knowledge lies)", ""]
        lines += group_table(m["knowledge_by_group"])
    if m.get("noise_floor"):
        lines += _noise_floor(m["noise_floor"])
    if m.get("forgetting"):
        lines += ["### Forgetting (base-model HighlyKnown items that dropped a category)", ""]
        lines += _table(["model", "base HighlyKnown", "dropped", "fraction"],
                        [[model, f["base_highly_known"], f["dropped"], pct(f["fraction"])]
                         for model, f in m["forgetting"].items()])
    figure(plots.fit_speed(m.get("fit_speed", {}), fig_dir / f"fit-speed-seed{seed}.png"), "fit speed")
    for stage, points in m.get("fit_speed", {}).items():
        lines += _fit_speed_table(stage, points)
    if m.get("selection"):
        lines += ["### Training sets", ""] + _table(["set", "items"], list(m["selection"].items()))
    if m.get("training"):
        lines += ["### Stages trained (the exported model is the best dev step's)", ""]
        lines += _table(["stage", "optimizer steps", "exported step", "best dev accuracy"],
                        [[stage, t["steps"], "–" if t["exported_step"] is None else t["exported_step"],
                          pct(t["best_dev_accuracy"])] for stage, t in m["training"].items() if not t["skipped"]])
    costs = m.get("costs", {})
    if costs:
        lines += ["### Costs", ""]
        if costs.get("steps"):
            lines += _table(["step", "wall time (s)"], [[s, f"{t:.1f}"] for s, t in costs["steps"].items()])
        if costs.get("probe"):
            lines += _table(["probe", "questions/s", "answers/s", "generated tokens/s"],
                            [[n, f"{p['questions_per_s']:.2f}", f"{p['answers_per_s']:.1f}",
                              f"{p['generated_tokens_per_s']:.1f}"] for n, p in costs["probe"].items()])
        if costs.get("train"):
            lines += _table(["training", "tokens/s", "steps", "wall time (s)"],
                            [[n, f"{t['tokens_per_s']:.1f}", t["steps"], f"{t['wall_s']:.1f}"]
                             for n, t in costs["train"].items()])
    return lines, figures


def group_table(groups: dict) -> list[str]:
    """One row per group of train items (knowledge_by_group), one column per model: HighlyKnown items."""
    models = [k for k in next(iter(groups.values())) if k != "items"]
    return _table(["items trained on", "items", *models],
                  [[group, g["items"], *(g[m] for m in models)] for group, g in groups.items()])


def _noise_floor(floor: dict) -> list[str]:
    r = floor["reprobe"]
    lines = ["### Probe-noise floor (the base model M0 probed again under another probe seed)", "",
             f"With no training at all, re-probing changed the category of {r['changed']} of {r['items']} train "
             f"items: {r['upgraded']} \"upgraded\" by stage 2's rule and {r['forgotten']} base HighlyKnown items "
             "\"forgotten\". Each model's counts beside that floor:", ""]
    return lines + _table(["model", "upgraded", "above the floor", "forgotten", "above the floor"],
                          [[model, m["upgraded"], f"{m['upgraded_above_floor']:+d}", m["forgotten"],
                            f"{m['forgotten_above_floor']:+d}"] for model, m in floor["models"].items()])


def _fit_speed_table(stage: str, points: list[dict]) -> list[str]:
    """Train exact match per category at each epoch, for a stage that trained on several categories
    (SliCK: are Unknown items fitted slower than HighlyKnown and MaybeKnown ones?)."""
    present = [c for c in CATEGORIES if any(c in p["accuracy_by_category"] for p in points)]
    if len(present) < 2:
        return []
    lines = [f"### Fit speed: {stage} (train exact match per epoch and category)", ""]
    return lines + _table(["category", *(f"epoch {p['epoch']:g}" for p in points)],
                          [[c, *(pct(p["accuracy_by_category"].get(c)) for p in points)] for c in present])


_MODEL_LABELS = {"M1": "M1 (one stage)", "M2": "M2 (gradual, two stages)"}


def _headline(table: list[dict]) -> list[str]:
    """The question the run answers, one row per model: only when baselines ran beside M1 and M2."""
    if not any(row["model"] not in _MODEL_LABELS for row in table):
        return []
    lines = ["## Does the two-stage schedule acquire more knowledge?", "",
             "Knowledge gain: HighlyKnown training items beyond the one-stage model M1, as a fraction of "
             "the training items. M2 − model: the paired difference per seed. Acquired gain and retained "
             "ratio: see Knowledge acquired per seed. Each cell: mean over seeds [95% t interval]; "
             "significant: the interval excludes 0.", ""]
    if _has_acquired(table):
        lines += [PAPER_COMPARISON, ""]
    if _has_floor(table):
        lines += ["Upgraded above the noise floor: items Weakly/Unknown under M0 that the model has MaybeKnown "
                  "or better (stage 2's rule), minus the items re-probing M0 alone under another probe seed "
                  "\"upgrades\" (items per seed).", ""]
    return lines + headline_table(table)


def _has_acquired(table: list[dict]) -> bool:
    return any(row.get("acquired_gain") for row in table)  # older metrics.json files: absent


def _has_floor(table: list[dict]) -> bool:
    return any(row.get("upgraded_above_floor") for row in table)  # runs with noise_floor on


def headline_table(table: list[dict]) -> list[str]:
    """The headline's table (metrics.json's aggregate_table, one row per model), also generated into
    the docs' evidence section (reproduce.evidence_table)."""
    has_acquired, has_floor = _has_acquired(table), _has_floor(table)
    rows = []
    for row in table:
        stats = [row[k] for k in ("knowledge_gain", "test_accuracy", "forgetting", "vs_M2_knowledge", "vs_M2_test")]
        versus = ["–"] * 4 if row["model"] == "M2" else [_mean_cell(row["vs_M2_knowledge"]),
                                                         _significant(row["vs_M2_knowledge"]),
                                                         _mean_cell(row["vs_M2_test"]), _significant(row["vs_M2_test"])]
        seeds = max((s["seeds"] for s in stats if s), default=0)
        acquired = [_signed_mean_cell(row.get(k)) for k in ("acquired_gain", "retained_ratio")] if has_acquired else []
        floor = [_count_cell(row.get("upgraded_above_floor"))] if has_floor else []
        rows.append([_MODEL_LABELS.get(row["model"], row["model"]), *(_mean_cell(s) for s in stats[:3]),
                     *acquired, *floor, *versus, seeds])
    return _table(["model", "knowledge gain vs M1", "test accuracy", "forgetting",
                   *(["acquired gain", "retained ratio"] if has_acquired else []),
                   *(["upgraded above the noise floor"] if has_floor else []),
                   "M2 − model: knowledge", "significant", "M2 − model: test", "significant", "seeds"], rows)


def render_report(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: not found (run `gradual run` first)")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if not metrics.get("seeds"):
        raise ReportError(f"{metrics_path}: no per-seed metrics ('seeds' is empty)")
    out_dir = run_dir / "report"
    fig_dir = out_dir / "figures"
    run = metrics.get("run", {})
    lines = ["# Gradual Learning report", ""] + _headline(metrics.get("aggregate_table", []))
    if run:
        lines += _table(["setting", "value"], [[k, f"`{v}`"] for k, v in run.items()])
    if metrics.get("aggregate"):
        lines += ["## Across seeds (mean, 95% t interval)", ""]
        lines += _table(["metric", "mean", "interval", "seeds"],
                        [[name, _fixed(a["mean"]), _interval(a, _fixed), a["seeds"]]
                         for name, a in metrics["aggregate"].items()])
    figures: list[Path] = []
    proportion_interval = metrics.get("intervals", {}).get("proportion", "bootstrap")
    for seed, seed_metrics in metrics["seeds"].items():
        section, figs = _seed_sections(seed, seed_metrics, fig_dir, proportion_interval)
        lines += section
        figures += figs
    markdown = "\n".join(lines)
    write_text(out_dir / "report.md", markdown)
    write_text(out_dir / "report.html", _to_html(markdown, out_dir))
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "figures": figures}


def render_training(train_dir: str | Path) -> dict:
    """A `gradual train` output directory: curves.png (loss; dev and train exact match) and a summary."""
    train_dir = Path(train_dir)
    losses = read_jsonl(train_dir / "losses.jsonl")
    evals = read_jsonl(train_dir / "evals.jsonl") if (train_dir / "evals.jsonl").exists() else []
    if not losses:
        raise ReportError(f"{train_dir / 'losses.jsonl'}: no optimizer steps recorded")
    figure = plots.training_curves(losses, evals, train_dir / "curves.png")
    # the trainer's own choice of best (the model it exports), as recorded at its last evaluation
    best_step = evals[-1]["best_step"] if evals else None
    best = next((r["dev"]["accuracy"] for r in evals if r["step"] == best_step and r.get("dev")), None)
    return {"figure": figure, "steps": losses[-1]["step"], "best_step": best_step, "best_dev_accuracy": best}


def _to_html(markdown: str, base: Path) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to one self-contained page."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if image := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((base / image[2]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(image[1])}</figcaption></figure>")
        elif heading := re.match(r"(#+) (.*)", line):
            level = len(heading[1])
            body.append(f"<h{level}>{html.escape(heading[2])}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f1f3f5}img{max-width:100%}code{background:#f1f3f5}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Gradual Learning "
            f"report</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
