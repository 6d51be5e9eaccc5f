"""The report's figures (matplotlib, no display). Each function writes one PNG and returns its path,
or None when the run has no data for that figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from toolkit.io import atomic_path  # noqa: E402
from toolkit.probe.slick import CATEGORIES  # noqa: E402

COLORS = {"HighlyKnown": "#2b8a3e", "MaybeKnown": "#74b816", "WeaklyKnown": "#f59f00", "Unknown": "#c92a2a"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def category_distribution(per_relation: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Stacked bars: the fraction of each relation's items in each category."""
    if not per_relation:
        return None
    relations = sorted(per_relation)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(relations) + 1.5))
    left = np.zeros(len(relations))
    for cat in CATEGORIES:
        values = np.array([per_relation[r].get(cat, 0.0) for r in relations])
        ax.barh(relations, values, left=left, color=COLORS[cat], label=cat)
        left += values
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of items")
    ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title("Base model knowledge per relation (SliCK categories)", pad=26)
    return _save(fig, path)


def transition_heatmap(matrix: dict[str, dict[str, int]], title: str, path: Path) -> Path | None:
    if not matrix:
        return None
    data = np.array([[matrix[a][b] for b in CATEGORIES] for a in CATEGORIES])
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.imshow(data, cmap="Blues")
    short = [c.replace("Known", "K.") for c in CATEGORIES]
    ax.set_xticks(range(4), short)
    ax.set_yticks(range(4), short)
    ax.set_xlabel("after")
    ax.set_ylabel("before")
    peak = data.max() or 1
    for i in range(4):
        for j in range(4):
            ax.text(j, i, str(data[i, j]), ha="center", va="center",
                    color="white" if data[i, j] > peak / 2 else "black")
    ax.set_title(title)
    return _save(fig, path)


def accuracy_by_category(test_accuracy: dict[str, dict[str, dict]], path: Path) -> Path | None:
    """Grouped bars with bootstrap error bars: test accuracy per base category for each model."""
    if not test_accuracy:
        return None
    groups = ["overall", *CATEGORIES]
    models = list(test_accuracy)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, model in enumerate(models):
        accs = [test_accuracy[model][g] for g in groups]
        values = np.array([a["accuracy"] for a in accs], dtype=float)
        low = np.array([a["low"] for a in accs], dtype=float)
        high = np.array([a["high"] for a in accs], dtype=float)
        err = np.nan_to_num(np.vstack([values - low, high - values]))
        x = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
        ax.bar(x, np.nan_to_num(values), width, yerr=err, capsize=3, label=model)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={test_accuracy[models[0]][g]['n']})" for g in groups])
    ax.set_ylabel("test exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, ncol=min(len(models), 5))
    ax.set_title("Test accuracy per base-model category (95% bootstrap intervals)")
    return _save(fig, path)


def fit_speed(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Training accuracy per epoch for each category, one panel per training stage."""
    stages = [s for s in curves if curves[s]]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        points = curves[stage]
        epochs = [p["epoch"] for p in points]
        for cat in CATEGORIES:
            ys = [p["accuracy_by_category"].get(cat) for p in points]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", color=COLORS[cat], label=cat)
        ax.set_title(f"{stage}: training accuracy per category")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def knowledge_acquired(acquired: dict, path: Path) -> Path | None:
    """HighlyKnown training items per model; the title names M2's acquired gain (older metrics.json
    files: M1 and M2 only, and the relative gain, today's retained ratio)."""
    if not acquired:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    if "relative_gain" in acquired:
        labels = ["one stage (M1)", "two stages (M2)"]
        values = [acquired["highly_known_one_stage"], acquired["highly_known_two_stage"]]
        gain, what = acquired["relative_gain"], "vs one stage"
    else:
        labels = ["base (M0)", "one stage (M1)", "two stages (M2)"]
        values = [acquired["highly_known_M0"], acquired["highly_known_M1"], acquired["highly_known"]]
        gain, what = acquired["acquired_gain"], "acquired gain"
    bars = ax.bar(labels, values, color=["#ced4da", "#868e96", "#1c7ed6"][-len(values):])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, str(v), ha="center", va="bottom")
    # no gain (None; NaN in older metrics.json) when M1 knows (acquired) no training item
    ax.set_title(f"HighlyKnown training items ({gain:+.0%} {what})" if gain is not None and gain == gain
                 else "HighlyKnown training items")
    return _save(fig, path)


def training_curves(losses: list[dict], evals: list[dict], path: Path) -> Path | None:
    """One training run: loss per step, and dev / train exact match at each evaluation."""
    if not losses:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="#495057", lw=1)
    left.set(title="training loss (answer tokens)", xlabel="optimizer step", ylabel="loss")
    for split, color in (("dev", "#1c7ed6"), ("train", "#2b8a3e")):
        points = [(r["step"], r[split]["accuracy"]) for r in evals if r.get(split)]
        if points:
            right.plot(*zip(*points), marker="o", color=color, label=f"{split} exact match")
    best = evals[-1]["best_step"] if evals else None
    if best is not None:
        right.axvline(best, color="#868e96", ls="--", lw=1, label=f"best (step {best})")
    right.set(title="greedy exact match (SFT format)", xlabel="optimizer step", ylim=(0, 1.02))
    right.legend(frameon=False, fontsize=8)
    return _save(fig, path)
