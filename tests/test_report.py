"""The report renders from metrics.json: the HTML parses, figures exist and are non-empty PNGs."""
import json
from html.parser import HTMLParser

import pytest

from toolkit.report import metrics as M
from toolkit.report.render import ReportError, render_report

H, MK, W, U = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
C0 = {"a": H, "b": H, "c": MK, "d": W, "e": U, "f": U}
C1 = {"a": H, "b": MK, "c": H, "d": MK, "e": U, "f": MK}
C2 = {"a": H, "b": H, "c": H, "d": H, "e": W, "f": H}


def constructed_metrics():
    correct = {"M0": dict(zip("abcdef", [True, False, False, False, False, False])),
               "M1": dict(zip("abcdef", [True, True, True, False, False, False])),
               "M2": dict(zip("abcdef", [True, True, True, True, False, True]))}
    seed = {
        "categories": {"m0_train": M.category_counts(C0), "m1_train": M.category_counts(C1),
                       "m2_train": M.category_counts(C2)},
        "per_relation": {"capital": {H: 0.5, MK: 0.25, W: 0.25, U: 0.0}, "city": {H: 0.1, MK: 0.1, W: 0.2, U: 0.6}},
        "transitions": {"C0 -> C1": M.transition_matrix(C0, C1), "C1 -> C2": M.transition_matrix(C1, C2)},
        "knowledge_acquired": M.knowledge_acquired(C1, C2),
        "forgetting": {"M1": M.forgetting(C0, C1), "M2": M.forgetting(C0, C2)},
        "test_accuracy": {name: M.accuracy_by_category(c, C0) for name, c in correct.items()},
        "comparisons": {"M2 vs M1": M.paired_difference(correct["M2"], correct["M1"])},
        "fit_speed": {"stage1": [{"epoch": 1, "accuracy_by_category": {MK: 0.5}},
                                 {"epoch": 2, "accuracy_by_category": {MK: 1.0}}]},
        "selection": {"stage1": 1, "stage2.upgraded": 2, "stage2.replay": 0},
        "costs": {"steps": {"probe_m0_train": 12.5},
                  "probe": {"m0_train": {"questions_per_s": 2.0, "answers_per_s": 30.0, "generated_tokens_per_s": 90.0}},
                  "train": {"stage1": {"tokens_per_s": 500.0, "steps": 10, "wall_s": 20.0}}},
    }
    return {"run": {"model": "tiny", "preset": "test"}, "seeds": {"0": seed},
            "aggregate": {"M2 test accuracy": M.mean_over_seeds([0.5, 0.6, 0.7])}}


class StrictParser(HTMLParser):
    VOID = {"meta", "img", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.images = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def test_report_renders_html_markdown_and_figures(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(constructed_metrics()))
    out = render_report(tmp_path)
    parser = StrictParser()
    parser.feed(out["html"].read_text())
    assert parser.stack == []  # every tag closed
    assert len(parser.images) == len(out["figures"]) == 6
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    for fig in out["figures"]:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 5000
    md = out["markdown"].read_text()
    assert "HighlyKnown training items: 2 after one stage, 5 after two stages (+3, relative gain 150.0%" in md
    assert "| M2 | 83.3%" in md  # 5 of 6 correct overall
    assert "| M1 | 2 | 1 | 50.0% |" in md  # forgetting row


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="metrics.json: not found"):
        render_report(tmp_path)
