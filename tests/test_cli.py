"""The command line: exit codes, one-line errors, validate and doctor output."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.cli import EXIT_BAD_INPUT, main


def test_validate_prints_counts_per_relation_and_split(tmp_path, capsys):
    rows = [{"question": f"Q{i}?", "answer": "A", "relation": "r1" if i % 2 else "r2",
             "split": "train" if i < 6 else "dev"} for i in range(8)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: 8 items" in out
    r1_line = next(line for line in out.splitlines() if line.startswith("r1"))
    assert r1_line.split() == ["r1", "1", "3"]  # dev, train


def test_validate_bad_file_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Q?", "split": "train"}\n')
    assert main(["data", "validate", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:1: field 'answer'" in err


def test_console_script_exit_code_for_missing_file(tmp_path):
    gradual = Path(sys.executable).parent / "gradual"
    proc = subprocess.run([str(gradual), "data", "validate", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: no such file or directory"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "probe", "train", "run", "report", "bench", "doctor"):
        assert f"    {command} " in out, command


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def test_doctor_reports_versions_backend_and_embedded_model(capsys):
    """What doctor says must match this machine, whichever kind it is (CPU only, GPU, flash-attn)."""
    import torch

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("torch", "deepspeed", "ray", "transformers", "datasets", "bitsandbytes"):
        assert report[key] == importlib.metadata.version(key) and report[key][0].isdigit(), (key, report[key])
    assert report["flash-attn"] == _installed_version("flash-attn")
    gpu = torch.cuda.is_available()
    flash = importlib.util.find_spec("flash_attn") is not None
    assert report["attention_backend"] == ("flash_attention_2" if gpu and flash else "sdpa")
    assert report["train_dtype"] == ("bfloat16" if gpu else "float32")  # (tests/test_doctor.py: the probe's)
    assert (report["cuda_devices"] == "none") == (not gpu)
    assert report["embedded_model"].endswith(".gguf") and Path(report["embedded_model"]).is_file()


@pytest.mark.parametrize("device, flash, expected", [
    ("cuda", True, "flash_attention_2"), ("cuda:1", True, "flash_attention_2"),
    ("cuda", False, "sdpa"), ("cpu", True, "sdpa"), ("cpu", False, "sdpa"),
])
def test_attention_backend_choice(monkeypatch, device, flash, expected):
    """FlashAttention-2 only on CUDA with flash-attn installed (both kinds of machine, simulated)."""
    from toolkit import models

    monkeypatch.setattr(models, "flash_attn_available", lambda: flash)
    assert models.choose_attention(device) == expected


def test_build_facts_then_validate(tmp_path, capsys):
    out = tmp_path / "facts"
    assert main(["data", "build-facts", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert main(["data", "validate", str(out)]) == 0
    assert f"ok: {stats['total']} items" in capsys.readouterr().out


def test_a_failed_step_is_its_message_and_exit_1(monkeypatch, capsys, tmp_path):
    from toolkit.cli import main
    from toolkit.gradual import pipeline

    def failing_run(self):
        raise pipeline.PipelineError("training failed (exit 7); full log: stage1/train.log")

    monkeypatch.setattr(pipeline.Pipeline, "run", failing_run)
    assert main(["run", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == "error: training failed (exit 7); full log: stage1/train.log"


def test_run_headline_prints_missing_numbers_as_n_a():
    """A rate over no items is null in metrics.json (no M1 HighlyKnown item: no relative gain); the
    summary `gradual run` prints must say n/a, not fail on it."""
    from toolkit.gradual.cli import headline

    no_interval = {"difference": 0.0, "low": None, "high": None, "n": 0}
    seed = {"test_accuracy": {"M1": {"overall": {"accuracy": None}}, "M2": {"overall": {"accuracy": 0.25}}},
            "knowledge_acquired": {"highly_known_one_stage": 0, "highly_known_two_stage": 2, "relative_gain": None},
            "forgetting": {"M2": {"dropped": 0, "base_highly_known": 0}},
            "comparisons": {"M2 vs M1 (two stages vs one)": no_interval},
            "item_comparisons": {"M2 vs M1": no_interval,
                                 "M2 vs random_stage2": {"difference": -0.1, "low": -0.2, "high": -0.05, "n": 10}}}
    lines = headline({"seeds": {"0": seed}})
    assert lines[0] == "seed 0: test accuracy M1 n/a, M2 25.0%"
    assert "(relative gain n/a)" in lines[1] and lines[3].endswith("+0.0% (no interval)")
    assert lines[4] == "  HighlyKnown train items, M2 vs random_stage2: -10.0% [-20.0%, -5.0%] (significant)"
