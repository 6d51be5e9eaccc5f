"""Generated documentation: docs/configuration.md from the typed config tree (every key with its
type, default and help text, as toolkit.config declares them), and the tables the README and
docs/evidence.md generate from committed results' metrics.json (the README's demo table, the evidence
result: toolkit.report.reproduce). tests/test_docs.py fails when a committed file differs from what
this writes.

    python -m toolkit.docgen            # rewrite them (make docs)
    python -m toolkit.docgen --check    # exit 1 and name the stale file(s)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = Path("docs/configuration.md")
GENERATED_TABLE_DOCS = (Path("README.md"), Path("docs/evidence.md"))


def type_name(kind: typing.Any) -> str:
    """A config field's type in words: `int or null`, `one of a, b`, `list of str`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args) if len(args) > 1 else f"`{args[0]}`"
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(inner[0]) if inner else 'str'}"
    if kind is dict or origin is dict:
        return "mapping"
    return getattr(kind, "__name__", str(kind))


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, frozenset)):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def key_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) of every key a user can set in `cls`, nested sections expanded."""
    from toolkit.config import config_fields

    hints = typing.get_type_hints(cls)
    rows = []
    for f in config_fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += key_rows(kind, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, type_name(kind), default_text(f), f.metadata.get("help", "")))
    return rows


def key_table(cls, prefix: str = "", exclude: typing.Iterable[str] = ()) -> list[str]:
    skip = set(exclude)
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, kind, default, help_text in key_rows(cls, prefix):
        if key[len(prefix):] in skip:
            continue
        lines.append(f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(help_text)} |")
    return lines


def moved_keys(cls, prefix: str = "") -> list[str]:
    """The keys that moved or were removed (MOVED_KEYS / REMOVED_KEYS of `cls` and its sections)."""
    from toolkit.config import config_fields

    hints = typing.get_type_hints(cls)
    lines = [f"- `{prefix}{old}` moved to `{prefix}{new}`" for old, new in getattr(cls, "MOVED_KEYS", {}).items()]
    lines += [f"- `{prefix}{old}` was removed: {why}" for old, why in getattr(cls, "REMOVED_KEYS", {}).items()]
    for f in config_fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += moved_keys(hints[f.name], f"{prefix}{f.name}.")
    return lines


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def _value_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def preset_lines() -> list[str]:
    from toolkit.gradual.config import PRESET_DIR

    lines = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        values.pop("notes", None)
        shown = ", ".join(f"`{k}={_cell(_value_text(v))}`" for k, v in _flatten(values))
        lines.append(f"- **{path.stem}** (`toolkit/configs/{path.name}`): {shown or 'the defaults'}")
    return lines


def configuration_markdown() -> str:
    """docs/configuration.md's text."""
    from toolkit.gradual.config import PIPELINE_PROBE_KEYS, PIPELINE_TRAIN_KEYS, PipelineConfig
    from toolkit.probe.runner import RunConfig
    from toolkit.train.launch import LaunchConfig

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m toolkit.docgen` (`make docs`) from the typed configs in toolkit/; "
        "edit the help texts there, not here. tests/test_docs.py fails when this file is stale. -->",
        "",
        "Every key is declared once in the code (`toolkit/config.py`: `knob(default, help)`), and read the same "
        "way from a YAML file, from `--set section.key=value`, and from the flags that `gradual probe` and "
        "`gradual train` generate from the same fields (`--lr 1e-5` is the key `lr`; a flag wins over `--set`, "
        "which wins over the YAML, which wins over the preset). An unknown key, or a value of the wrong type, "
        "stops the command with one line naming the file and the key, before anything runs. `null` means "
        "\"not set\": the code decides (the help text says how).",
        "",
        "## `gradual run`: the pipeline config",
        "",
        "A YAML file (`gradual run my.yaml`), a preset (`--preset NAME`), and `--set key=value` for any key "
        "below. The sections `probe` (the probe's settings and `probe.placement`, its Ray actors), `selection` "
        "and `train` (the launcher's keys, with the trainer's own config under `train.options`) are the same "
        "configs that `gradual probe` and `gradual train` read.",
        "",
        *key_table(PipelineConfig),
        "",
        "Set by the pipeline, refused in a pipeline config: "
        + ", ".join(f"`probe.{k}` (per entry of `seeds`)" for k in PIPELINE_PROBE_KEYS) + ", "
        + ", ".join(f"`train.options.{k}` ({how})" for k, how in PIPELINE_TRAIN_KEYS.items()) + ".",
        "",
        "### Presets",
        "",
        "A preset is a YAML file of the keys it changes from the defaults above (`gradual run --preset NAME`; "
        "a config file and `--set` apply on top of it):",
        "",
        *preset_lines(),
        "",
        "### Keys that moved or were removed",
        "",
        "A config that still uses one of these is refused with a line saying where the key went:",
        "",
        *moved_keys(PipelineConfig),
        "",
        "## `gradual probe`: flags",
        "",
        "`gradual probe` takes the keys of `probe.*` and `probe.placement.*` above as flags (`--samples 8`, "
        "`--num-actors 4`), and these for what to probe:",
        "",
        *key_table(RunConfig),
        "",
        "## `gradual train`: the training config",
        "",
        "`gradual train --config train.yaml` reads the keys of `train.options.*` above at the top level of its "
        "YAML (`lr: 1e-5`), each also a flag (`--lr 1e-5`, or DeepSpeed's spelling `--micro_batch_size`) and "
        "`--set lr=1e-5`. The launch takes these flags (the same as `train.*` in a pipeline config):",
        "",
        *key_table(LaunchConfig),
        "",
    ]
    return "\n".join(lines)


def write_docs(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Rewrite (or with `check`, only compare) the generated files; the ones that were stale."""
    from toolkit.report.reproduce import update_generated

    stale = []
    config_doc = root / CONFIG_DOC
    text = configuration_markdown()
    if not config_doc.is_file() or config_doc.read_text(encoding="utf-8") != text:
        stale.append(CONFIG_DOC)
        if not check:
            config_doc.parent.mkdir(parents=True, exist_ok=True)
            config_doc.write_text(text, encoding="utf-8")
    stale += [doc for doc in GENERATED_TABLE_DOCS if update_generated(root / doc, root, write=not check)]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.docgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    stale = write_docs(check=args.check)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
