"""The command line: exit codes, one-line errors, validate and doctor output."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for command in ("data", "doctor"):
        assert command in out


def test_doctor_reports_versions_backend_and_embedded_model(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("torch", "deepspeed", "ray", "transformers", "datasets", "bitsandbytes"):
        assert report[key][0].isdigit(), (key, report[key])
    assert report["attention_backend"] == "sdpa"  # CPU: no flash-attn
    assert report["embedded_model"].endswith(".gguf")
    assert report["flash-attn"] == "not installed"


def test_build_facts_then_validate(tmp_path, capsys):
    out = tmp_path / "facts"
    assert main(["data", "build-facts", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert main(["data", "validate", str(out)]) == 0
    assert f"ok: {stats['total']} items" in capsys.readouterr().out
