"""Shared by the benchmarks: environment record, result files, tables, README sections, hardware
ceilings, timing and memory helpers, and the input bundle a GPU machine without the embedded model
(or the facts packages) needs.

Result files: benchmarks/results/<name>-<device>[-<tag>]-<date>.json (+ .png), written atomically.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
DEFAULT_INPUTS = REPO_ROOT / ".cache" / "bench-inputs"  # see export_inputs()
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: the toolkit is importable
    sys.path.insert(1, str(REPO_ROOT))
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_AUTH_MODE", "disabled")):
    os.environ.setdefault(_key, _value)

PACKAGES = ("torch", "transformers", "deepspeed", "ray", "bitsandbytes", "accelerate", "flash-attn", "triton")


# ---------------------------------------------------------------- environment record


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit the code came from ($GRADUAL_GIT_COMMIT on a machine that got a copy without .git)."""
    if os.environ.get("GRADUAL_GIT_COMMIT"):
        return os.environ["GRADUAL_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "git_commit": git_commit(), "versions": {p: _version(p) for p in PACKAGES},
           "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "memory_bytes": p.total_memory, "sm_count": p.multi_processor_count})
    env["device"] = env["gpus"][0]["name"] if env["gpus"] else f"CPU ({env['cpu']}, {env['cpu_count']} cores)"
    return env


def device_tag() -> str:
    """Short device name for file names: 'cpu', 'h100', 'h200', 'a100', ... ."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    match = re.search(r"\b([a-z]\d{2,4})\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ---------------------------------------------------------------- result files and tables


def result_path(name: str, out_dir: Path, tag: str | None = None, device: str | None = None) -> Path:
    date = _dt.date.today().isoformat()
    parts = [name, device or device_tag(), *([tag] if tag else []), date]
    return Path(out_dir) / ("-".join(parts) + ".json")


def write_result(path: Path, payload: dict) -> Path:
    from toolkit.io import write_json

    write_json(path, payload)
    return path


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if size >= 10 else (f"{value:.2f}" if size >= 1 else f"{value:.3g}")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table (also readable on a terminal); columns: (key, header)."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h) in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths]), *map(line, cells)])


def update_readme(section: str, markdown: str, readme: Path = README) -> bool:
    """Replace the text between '<!-- section:begin -->' and '<!-- section:end -->' (appended if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    from toolkit.io import write_text

    write_text(readme, text)
    return True


def add_common_args(p, presets: dict) -> None:
    """Options every benchmark has: preset, inputs, output and re-plotting."""
    p.add_argument("--preset", choices=presets, default="cpu", help="default sizes (the flags override them)")
    p.add_argument("--inputs", help="input bundle (facts/ + tokenizer/) from bench_sampling.py --export-inputs")
    p.add_argument("--data", help="QA dataset with train (and dev) splits (default: the built-in facts)")
    p.add_argument("--tokenizer", help="tokenizer directory for random shapes (default: the embedded SmolLM2's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--tag", help="extra part of the result file name")
    p.add_argument("--replot", type=Path, metavar="JSON", help="print tables, write the PNG (and README) from a result")


def apply_preset(args, presets: dict):
    """Preset values for every option left unset; the GPU presets' input bundle only where it exists."""
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.inputs == str(DEFAULT_INPUTS) and not DEFAULT_INPUTS.exists():
        args.inputs = None  # where the embedded model and the facts packages are installed it is not needed
    return args


def config_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def env_line(env: dict, path: Path, *packages: str) -> str:
    versions = ", ".join(f"{p} {env['versions'].get(p)}" for p in packages)
    return f"{env['device']}; {versions}; {env['date']}; commit {env['git_commit']}; `{Path(path).name}`"


def publish(text: str, path: Path, plot) -> None:
    """Print the tables, write the PNG beside the JSON, and refresh the README section of a result
    in benchmarks/results/ (section name-device[-tag], without the date)."""
    print(text)
    png = Path(path).with_suffix(".png")
    plt = pyplot()
    if plt is None:
        print(f"matplotlib missing: no {png.name} (run --replot {path} where it is installed)")
    else:
        fig = plot(plt)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    if in_results_dir(path):
        update_readme("-".join(Path(path).stem.split("-")[:-3]), text)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None where matplotlib is missing (re-plot elsewhere
    from the JSON with --replot)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def in_results_dir(path: Path) -> bool:
    return Path(path).resolve().parent == RESULTS_DIR.resolve()


# ---------------------------------------------------------------- timing, memory, ceilings


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) with the device synchronised on both sides."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def reset_peak_memory() -> int:
    """Start a peak-memory window; returns the bytes allocated now (GPU; 0 on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_memory(base_bytes: int = 0, weight_bytes: int = 0) -> dict:
    """GPU: max allocated in the window, and `alone_bytes` = weights + what the window added on top of
    `base_bytes` (what a process running only this would need; leftovers of earlier runs excluded).
    CPU: the process's peak RSS so far (process-wide and never reset)."""
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        return {"bytes": peak, "alone_bytes": weight_bytes + peak - base_bytes, "kind": "cuda_max_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "process_peak_rss"}


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _copy_bandwidth(n_bytes: int, reps: int) -> float:
    import torch

    src = torch.ones(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: [dst.copy_(src) for _ in range(reps)])
    return 2 * n_bytes * reps / seconds  # every byte is read once and written once


def _matmul_flops(n: int, reps: int) -> float:
    import torch

    a, b, c = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    for _ in range(3):
        torch.matmul(a, b, out=c)
    _, seconds = timed(lambda: [torch.matmul(a, b, out=c) for _ in range(reps)])
    return 2 * n**3 * reps / seconds


def measure_ceilings(copy_gib: float = 2.0, matmul_n: int = 8192, reps: int = 10) -> dict | None:
    """Measured HBM bandwidth (a large device-to-device copy) and dense bf16 matmul FLOP/s; None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    n_bytes = int(copy_gib * 2**30)
    ceilings = {"hbm_bytes_per_s": _copy_bandwidth(n_bytes, reps), "bf16_flops_per_s": _matmul_flops(matmul_n, reps),
                "copy_bytes": n_bytes, "matmul_n": matmul_n}
    free_memory()
    return ceilings


# ---------------------------------------------------------------- inputs (facts and tokenizer)


def export_inputs(out_dir: Path) -> Path:
    """Write the built-in facts (facts/) and the embedded SmolLM2 tokenizer (tokenizer/, ~4 MB) for a
    machine that has neither the facts packages nor the embedded model (the GPU machine)."""
    import shutil

    from toolkit.data.facts import build_facts
    from toolkit.models import load_tokenizer, resolve_source

    out_dir = Path(out_dir)
    build_facts(out_dir / "facts")
    load_tokenizer(None).save_pretrained(out_dir / "tokenizer")
    # the toolkit takes a directory for a tokenizer only if it looks like a model directory
    shutil.copy(Path(resolve_source(None)) / "config.json", out_dir / "tokenizer" / "config.json")
    return out_dir


def resolve_inputs(inputs: str | None, data: str | None, tokenizer: str | None) -> tuple[str | None, str | None]:
    """(data, tokenizer) from an input bundle unless given one by one; None means built-in/embedded."""
    if inputs:
        root = Path(inputs)
        if not (root / "facts").is_dir() or not (root / "tokenizer").is_dir():
            raise SystemExit(f"error: {root} is not an input bundle (make one with "
                             f"`python benchmarks/bench_sampling.py --export-inputs {root}`)")
        data = data or str(root / "facts")
        tokenizer = tokenizer or str(root / "tokenizer")
    return data, tokenizer


def start_vllm(model, tokenizer, sampling, gpu_share: float = 1.0):
    """A vLLM engine on the same weights in the same dtype as `model` (a random-init model is saved to a
    temporary directory first). On a GPU it takes `gpu_share` of the memory (the loaded model keeps
    the rest)."""
    import dataclasses
    import tempfile

    from toolkit.probe.vllm_engine import VLLMEngine

    path = model.config.name_or_path
    if not path or not Path(path).is_dir():
        path = tempfile.mkdtemp(prefix="bench-vllm-")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    weights = next(model.parameters())
    config = dataclasses.replace(sampling, engine="vllm", dtype=str(weights.dtype).removeprefix("torch."))
    return VLLMEngine.start(path, tokenizer, config, device="cuda" if weights.is_cuda else "cpu", gpu_share=gpu_share)


def untie_random_head(model, seed: int = 0) -> bool:
    """Give a randomly initialised model with tied embeddings an output head of its own (random, the same
    initialisation scale); returns whether it was tied. Tied, such a model answers every prompt by
    repeating the prompt's last token (the residual stream stays near that token's embedding, which the
    tied head scores highest): every probe prompt ends in ':' and every answer normalises to nothing, so
    answers would agree across engines trivially and no gold could be planted. Own head: varied tokens."""
    import torch

    if not model.config.tie_word_embeddings:
        return False
    head = model.get_output_embeddings()
    generator = torch.Generator(device=head.weight.device).manual_seed(seed)
    weight = torch.empty_like(head.weight).normal_(0.0, model.config.initializer_range, generator=generator)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.config.tie_word_embeddings = False  # saved and reloaded (vLLM, the actors) with the head of its own
    return True


def load_items(data: str | None, with_dev: bool = True):
    """(train items, dev items): a QA dataset on disk, or the built-in facts."""
    if data:
        from toolkit.data.loading import load_qa

        return load_qa(data, splits=("train",)), load_qa(data, splits=("dev",)) if with_dev else []
    from toolkit.data.facts import load_builtin_items

    items = load_builtin_items()
    return [i for i in items if i.split == "train"], [i for i in items if i.split == "dev"]


def spread(items: list, count: int, salt: str = "bench") -> list:
    """`count` items in a fixed pseudo-random order: a mix of relations, the same in every run."""
    from toolkit.data.prompts import stable_seed

    return sorted(items, key=lambda it: stable_seed(salt, it.id))[:count]


def materialise_random(model_source: str, tokenizer_dir: str, out_dir: Path, dtype: str) -> str:
    """A random-init model of a named shape saved with a tokenizer as a HF directory: what a machine
    without the embedded SmolLM2 (random shapes borrow its tokenizer) can hand to Ray actors or the
    trainer."""
    import torch

    from toolkit.models import ModelSpec, default_device, load_model

    spec = ModelSpec(source=model_source, tokenizer=tokenizer_dir, dtype=dtype, device=default_device())
    try:
        with torch.device(spec.device):  # initialised where it will live: minutes faster for 1B+ on a GPU box
            model, tokenizer = load_model(spec)
    except Exception:  # noqa: BLE001 -- the usual way: initialised on the CPU, then moved
        model, tokenizer = load_model(spec)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    free_memory()
    return str(out_dir)
