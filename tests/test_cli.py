"""The command line: exit codes, one-line errors, validate and doctor output."""
import importlib.metadata
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
    """What doctor says about this machine, read here by other means: the packages' metadata, torch's
    own view of the GPUs. (What dtype auto becomes here: tests/test_doctor.py.)"""
    import torch

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("torch", "deepspeed", "ray", "transformers", "datasets", "bitsandbytes"):
        assert report[key] == importlib.metadata.version(key) and report[key][0].isdigit(), (key, report[key])
    assert report["flash-attn"] == _installed_version("flash-attn")
    if torch.cuda.is_available():
        assert report["cuda_devices"].startswith(f"{torch.cuda.device_count()} x ")
        flash_installed = report["flash-attn"] != "not installed"
        assert report["attention_backend"] == ("flash_attention_2" if flash_installed else "sdpa")
    else:  # a machine without a GPU (this one): PyTorch's SDPA, whatever is installed
        assert report["cuda_devices"] == "none" and report["attention_backend"] == "sdpa"
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
    """The built-in benchmark (offline, split seed 0): 3896 facts in 11 relations, and validate reads
    back the counts the builder wrote."""
    out = tmp_path / "facts"
    assert main(["data", "build-facts", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"wrote 3896 items in 11 relations to {out}"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == 3896 and stats["splits"] == {"train": 2640, "dev": 606, "test": 650}
    assert main(["data", "validate", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split() == ["total", "606", "650", "2640"] and lines[-1] == "ok: 3896 items"  # dev, test, train


@pytest.mark.slow  # one real DeepSpeed launch whose rank fails (~30 s)
def test_a_failed_training_stage_reaches_the_user_as_its_message_and_exit_1(tmp_path, capsys):
    """`gradual run` whose stage-1 training fails for real (the base model's weights file is damaged:
    only the ranks read the weights): exit 1, and stderr ends with the pipeline's own message, the
    launcher's last lines (the rank's error among them) and where the full log is."""
    from tests import tiny
    from toolkit.io import write_json, write_jsonl

    items = tiny.synthetic_items(per_relation=8)  # 4 train, 2 dev, 2 test per relation
    data = tmp_path / "data"
    for split in ("train", "dev", "test"):
        write_jsonl(data / f"{split}.jsonl", [it.to_dict() for it in items if it.split == split])
    model = tiny.build_model_dir(tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": str(model), "data": {"path": str(data)},
        "probe": {"splits": ["train", "test"], "num_exemplar_sets": 1, "shots": 1, "samples": 1,
                  "max_new_tokens": 4, "placement": {"num_actors": 1, "cpus_per_actor": 1}},
        "train": {"num_accelerators": 1, "options": {"epochs": 1, "micro_batch_size": 2, "max_len": 48,
                                                     "optimizer": "adamw", "progress": False}}}))
    run = tmp_path / "run"
    # The base model's probes recorded as done (a resumed run's state), so stage 1's training is the
    # first step that runs: every train item MaybeKnown, all of them stage 1's
    for split in ("train", "test"):
        out = run / "seed-0" / "probe" / f"m0-{split}"
        write_jsonl(out / "categories.jsonl",
                    [{"id": it.id, "category": "MaybeKnown"} for it in items if it.split == split])
        write_json(run / "state" / f"seed0.probe_m0_{split}.json",
                   {"step": f"seed0.probe_m0_{split}", "wall_s": 0.0, "summary": {"dir": str(out)}})

    assert main(["run", str(config), "--out", str(run)]) == 1
    err = capsys.readouterr().err.splitlines()
    first = next(n for n, line in enumerate(err) if line.startswith("error: "))
    log = run / "seed-0" / "stage1" / "train.log"
    launcher_tail = log.read_text().splitlines()[-20:]
    assert err[first:] == ["error: training failed (exit 1); last lines:",
                           *(line.rstrip() for line in launcher_tail), f"full log: {log}"]
    assert any("SafetensorError" in line for line in launcher_tail), launcher_tail  # the rank's own error
    assert not (run / "state" / "seed0.train_stage1.json").exists()  # the failed step is not done


def test_run_headline_prints_missing_numbers_as_n_a():
    """A rate over no items is null in metrics.json (M1 acquired nothing: no acquired gain or
    retained ratio); the summary `gradual run` prints must say n/a, not fail on it."""
    from toolkit.gradual.cli import headline

    no_interval = {"difference": 0.0, "low": None, "high": None, "n": 0}
    seed = {"test_accuracy": {"M1": {"overall": {"accuracy": None}}, "M2": {"overall": {"accuracy": 0.25}}},
            "knowledge_acquired": {"M2": {"highly_known_M0": 0, "highly_known_M1": 0, "highly_known": 2,
                                          "acquired_M1": 0, "acquired": 2, "acquired_gain": None,
                                          "retained_ratio": None}},
            "forgetting": {"M2": {"dropped": 0, "base_highly_known": 0}},
            "comparisons": {"M2 vs M1 (two stages vs one)": no_interval},
            "item_comparisons": {"M2 vs M1": no_interval,
                                 "M2 vs random_stage2": {"difference": -0.1, "low": -0.2, "high": -0.05, "n": 10}}}
    lines = headline({"seeds": {"0": seed}})
    assert lines[0] == "seed 0: test accuracy M1 n/a, M2 25.0%"
    assert lines[1] == ("  HighlyKnown train items: 0 base -> 0 after stage 1 -> 2 after stage 2 "
                        "(acquired gain n/a, retained ratio n/a)")
    assert lines[3].endswith("+0.0% (no interval)")
    seed["knowledge_acquired"]["M2"].update(highly_known_M0=1, highly_known_M1=5, highly_known=6, acquired_gain=0.25,
                                            retained_ratio=0.2)
    assert headline({"seeds": {"0": seed}})[1].endswith("1 base -> 5 after stage 1 -> 6 after stage 2 "
                                                        "(acquired gain +25.0%, retained ratio +20.0%)")
    assert lines[4] == "  HighlyKnown train items, M2 vs random_stage2: -10.0% [-20.0%, -5.0%] (significant)"
