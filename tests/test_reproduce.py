"""`make demo`'s last step (gradual report RUN --compare 'DIR-{dtype}') and the README's demo table,
on constructed metrics.json files."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.report import reproduce

TEMPLATE = "results/demo-cpu-{dtype}"


def metrics(dtype="float32 (requested auto)", device="CPU: AMD EPYC (2 cores; no native bf16)", hk=(31, 33, 33),
            test=(0, 3, 3), upgraded=0):
    cats = {m: {"HighlyKnown": h, "MaybeKnown": 14, "WeaklyKnown": 5, "Unknown": 81 - h} for m, h in zip(("M0", "M1", "M2"), hk)}
    return {"run": {"preset": "default", "items (train/dev/test)": "100/30/50", "probe dtype": dtype, "device": device},
            "seeds": {"0": {"categories": {f"{m} train": c for m, c in cats.items()},
                            "test_accuracy": {m: {"overall": {"accuracy": t / 50, "n": 50, "low": 0, "high": 1}}
                                              for m, t in zip(("M0", "M1", "M2"), test)},
                            "selection": {"stage1: stage1": 14, "stage2: upgraded": upgraded, "stage2: replay": 0},
                            "forgetting": {"M2": {"dropped": 2, "base_highly_known": hk[0], "fraction": 2 / hk[0]}}}}}


def write(path: Path, content: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("recorded, resolved", [("float32", "float32"), ("bfloat16 (requested auto)", "bfloat16"),
                                                ("bfloat16, float32 (requested auto)", None), (None, None)])
def test_the_dtype_the_probes_resolved_picks_the_committed_result(recorded, resolved):
    assert reproduce.resolved_dtype(metrics(dtype=recorded)) == resolved
    old = {"run": {"probe": "N_ex=2 k=2 n=4 T=0.5 top-k=40 (lazy sampling, dtype auto)"}}  # before "probe dtype"
    assert reproduce.resolved_dtype(old) is None
    assert reproduce.committed_dir(TEMPLATE, "bfloat16") == "results/demo-cpu-bfloat16"


def test_same_numbers_reproduce(tmp_path):
    write(tmp_path / "results/demo-cpu-float32", metrics(device="CPU: Intel Xeon (8 cores; bf16: avx512_bf16, amx_bf16)"))
    run = write(tmp_path / "run", metrics())
    line = reproduce.compare_line(run, TEMPLATE, root=tmp_path)
    assert line.startswith("reproduced the committed float32 demo (results/demo-cpu-float32)") and "\n" not in line


def test_other_numbers_are_named_ours_vs_committed_with_why(tmp_path):
    write(tmp_path / "results/demo-cpu-float32", metrics(device="CPU: Intel Xeon (8 cores; bf16: avx512_bf16, amx_bf16)"))
    run = write(tmp_path / "run", metrics(hk=(35, 35, 35), test=(0, 3, 9), upgraded=1))
    line = reproduce.compare_line(run, TEMPLATE, root=tmp_path)
    assert line.startswith("differs from the committed float32 demo (results/demo-cpu-float32): ")
    assert "M0 train HK/MK/WK/UK 35/14/5/46 vs 31/14/5/50" in line
    assert "M2 test exact match 18.0% (9 of 50) vs 6.0% (3 of 50)" in line and "stage-2 upgraded items 1 vs 0" in line
    assert "M1 test exact match" not in line  # equal numbers are not listed
    assert "ran on CPU: AMD EPYC" in line and "the committed one on CPU: Intel Xeon" in line and "CPU or GPU kind" in line
    assert "\n" not in line
    # the same device: not the hardware, so the install is suspect
    write(tmp_path / "results/demo-cpu-float32", metrics())
    assert "check the install" in reproduce.compare_line(run, TEMPLATE, root=tmp_path)


def test_a_missing_committed_result_or_dtype_is_said_in_one_line(tmp_path):
    run = write(tmp_path / "run", metrics(dtype="bfloat16 (requested auto)"))
    line = reproduce.compare_line(run, TEMPLATE, root=tmp_path)
    assert line == "no committed bfloat16 demo to compare with: results/demo-cpu-bfloat16/metrics.json does not exist"
    write(tmp_path / "run", metrics(dtype=None))
    assert reproduce.compare_line(run, TEMPLATE, root=tmp_path).startswith("cannot pick the committed result")


def test_the_cli_compares_without_rewriting_the_run(tmp_path, monkeypatch, capsys):
    write(tmp_path / "results/demo-cpu-float32", metrics())
    run = write(tmp_path / "run", metrics(test=(0, 3, 9)))
    before = (run / "metrics.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run", "--compare", TEMPLATE]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("differs from the committed float32 demo")
    assert (run / "metrics.json").read_bytes() == before and not (run / "report").exists()


def test_the_readme_table_comes_from_metrics_and_is_regenerated_in_place(tmp_path):
    write(tmp_path / "results/demo", metrics(hk=(31, 33, 33), test=(0, 3, 3)))
    table = reproduce.readme_table(metrics(), "results/demo")
    assert "| HighlyKnown train items (of 100) | 31 | 33 | 33 |" in table
    assert "| test exact match (n=50) | 0.0% | 6.0% | 6.0% |" in table and "stage 2 skipped" in table
    assert "probe dtype float32 (requested auto)" in table and "device CPU: AMD EPYC" in table
    stale = table.replace("| 31 | 33 | 33 |", "| 31 | 33 | 34 |")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{stale}\n\nafter\n")
    assert reproduce.generated_blocks(readme.read_text()) == [("demo-table", "results/demo", stale)]
    assert reproduce.update_generated(readme, root=tmp_path) is True
    assert readme.read_text() == f"# Title\n\n{table}\n\nafter\n"
    assert reproduce.update_generated(readme, root=tmp_path) is False


def test_several_seeds_are_compared_seed_by_seed():
    one = metrics()
    two = copy.deepcopy(one)
    two["seeds"]["1"] = copy.deepcopy(one["seeds"]["0"])
    other = copy.deepcopy(two)
    other["seeds"]["1"]["selection"]["stage2: upgraded"] = 4
    assert reproduce.differences(other, two) == [("seed 1: stage-2 upgraded items", "4", "0")]
    assert reproduce.differences(two, one)[0] == ("seed 1: M0 train HK/MK/WK/UK", "31/14/5/50", None)  # one run has seed 1
