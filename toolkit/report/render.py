"""`gradual report RUN_DIR`: metrics.json -> report/ with PNG figures, report.md and a self-contained
report.html (figures embedded), both written atomically.

metrics.json (written by the pipeline) holds, per seed:
  categories        {probe name: {category: count}}       e.g. m0_train, m1_train, m2_train
  per_relation      {relation: {category: fraction}}      base model on train
  transitions       {"C0 -> C1": matrix, ...}             matrix[before][after] = count
  knowledge_acquired, forgetting {model: ...}, test_accuracy {model: {overall|category: acc}},
  comparisons       {"M2 vs M1": paired difference, ...}
  fit_speed         {stage: [{epoch, accuracy_by_category}]}
  selection         {set name: size}
  costs             {"steps": {step: seconds}, "probe": {name: {...}}, "train": {name: {...}}}
and `aggregate` (means over seeds) when several seeds ran.
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


class ReportError(ValueError):
    """A run directory without the metrics a report needs."""


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _acc_cell(acc: dict) -> str:
    if not acc.get("n"):
        return "–"
    return f"{_pct(acc['accuracy'])} [{_pct(acc['low'])}, {_pct(acc['high'])}] (n={acc['n']})"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _seed_sections(seed: str, m: dict, fig_dir: Path) -> tuple[list[str], list[Path]]:
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
        lines += ["### Test accuracy (exact match, per base-model category, 95% bootstrap interval)", ""]
        lines += _table(["model", "overall", *CATEGORIES],
                        [[model, *(_acc_cell(acc[g]) for g in ["overall", *CATEGORIES])]
                         for model, acc in m["test_accuracy"].items()])
        figure(plots.accuracy_by_category(m["test_accuracy"], fig_dir / f"accuracy-seed{seed}.png"),
               "test accuracy per category")
    if m.get("comparisons"):
        lines += ["### Paired comparisons on test (accuracy difference, 95% paired bootstrap)", ""]
        lines += _table(["comparison", "difference", "interval", "significant"],
                        [[name, _pct(d["difference"]), f"[{_pct(d['low'])}, {_pct(d['high'])}]",
                          "yes" if d["low"] > 0 or d["high"] < 0 else "no"]
                         for name, d in m["comparisons"].items()])
    if m.get("knowledge_acquired"):
        k = m["knowledge_acquired"]
        lines += ["### Knowledge acquired", "",
                  f"HighlyKnown training items: {k['highly_known_one_stage']} after one stage, "
                  f"{k['highly_known_two_stage']} after two stages ({k['gain']:+d}, "
                  f"relative gain {_pct(k['relative_gain'])}; the paper reports +24%).", ""]
        figure(plots.knowledge_acquired(k, fig_dir / f"knowledge-seed{seed}.png"), "knowledge acquired")
    if m.get("forgetting"):
        lines += ["### Forgetting (base-model HighlyKnown items that dropped a category)", ""]
        lines += _table(["model", "base HighlyKnown", "dropped", "fraction"],
                        [[model, f["base_highly_known"], f["dropped"], _pct(f["fraction"])]
                         for model, f in m["forgetting"].items()])
    figure(plots.fit_speed(m.get("fit_speed", {}), fig_dir / f"fit-speed-seed{seed}.png"), "fit speed")
    if m.get("selection"):
        lines += ["### Training sets", ""] + _table(["set", "items"], list(m["selection"].items()))
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
    lines = ["# Gradual Learning report", ""]
    if run:
        lines += _table(["setting", "value"], [[k, f"`{v}`"] for k, v in run.items()])
    if metrics.get("aggregate"):
        lines += ["## Across seeds (mean, 95% t interval)", ""]
        lines += _table(["metric", "mean", "interval", "seeds"],
                        [[name, f"{a['mean']:.4f}", f"[{a['low']:.4f}, {a['high']:.4f}]", a["seeds"]]
                         for name, a in metrics["aggregate"].items()])
    figures: list[Path] = []
    for seed, seed_metrics in metrics["seeds"].items():
        section, figs = _seed_sections(seed, seed_metrics, fig_dir)
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
