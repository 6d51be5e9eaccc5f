"""Typed configs: nested YAML, --set overrides, and one clear error per bad key or value."""
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

import pytest

from toolkit.config import (ConfigError, add_arguments, apply_overrides, from_dict, given_arguments, given_keys, knob,
                            knob_of, load, require, to_dict, with_values)


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-5
    categories: tuple[str, ...] = ("MaybeKnown",)
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"inner.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    epochs: int = 3
    resume: bool = False
    limit: Optional[int] = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ninner:\n  lr: 2.0e-5\n  categories: [MaybeKnown, WeaklyKnown]\n")
    cfg = load(Outer, path, ["epochs=5", "inner.mode=b", "resume=yes", "limit=none"])
    assert cfg == Outer(name="demo", epochs=5, resume=True, limit=None,
                        inner=Inner(lr=2e-5, categories=("MaybeKnown", "WeaklyKnown"), mode="b"))
    assert load(Outer, None, ["inner.categories=HighlyKnown,Unknown"]).inner.categories == ("HighlyKnown", "Unknown")
    assert to_dict(cfg)["inner"]["categories"] == ["MaybeKnown", "WeaklyKnown"]


@pytest.mark.parametrize("yaml_text,overrides,message", [
    ("nmae: x\n", [], "c.yaml: unknown key 'nmae'"),
    ("inner:\n  lrr: 1\n", [], "c.yaml: unknown key 'inner.lrr'"),
    ("", ["inner.foo=1"], "unknown key 'inner.foo'"),
    ("epochs: three\n", [], "epochs='three' must be an integer"),
    ("", ["resume=maybe"], "resume='maybe' must be true or false"),
    ("", ["inner.mode=c"], "inner.mode='c' must be one of a, b"),
    ("", ["inner.lr=-1"], "inner.lr must be > 0"),
    ("inner: 3\n", [], "inner=3 must be a mapping"),
    ("- a\n- b\n", [], "expected a mapping"),
    ("name: [unclosed\n", [], "c.yaml:2: malformed YAML"),
    ("", ["epochs"], "--set expects KEY=VALUE"),
    ("", ["name.x=1"], "name={'x': '1'} must be a string"),
    ("name: run\n", ["name.x=1"], "'name' is not a section"),
])
def test_bad_config_is_one_clear_error(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(Outer, path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(Outer, tmp_path / "nope.yaml")


def test_overrides_do_not_mutate_the_input():
    base = {"inner": {"lr": 1}}
    merged = apply_overrides(base, ["inner.lr=2"])
    assert base == {"inner": {"lr": 1}} and merged == {"inner": {"lr": "2"}}


@dataclass(frozen=True)
class Knobbed:
    """A config declared with knob(): help text, checks with require(), given keys, a moved key."""

    size: int = knob(4, "how many")
    mode: Literal["a", "b"] = knob("a", "which mode")
    fast: bool = knob(False, "go fast")
    resume: Union[bool, str] = knob(False, "true or a directory")
    inner: Inner = knob(factory=Inner, help="a nested section")
    given_keys: frozenset = given_keys()

    MOVED_KEYS: ClassVar[dict] = {"old_size": "size"}
    REMOVED_KEYS: ClassVar[dict] = {"speed": "`fast` decides it"}

    def __post_init__(self):
        require(self.size >= 1, "size", self.size, "must be >= 1")


def test_checks_name_the_full_key_and_the_file(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("sub:\n  size: 0\n")

    @dataclass(frozen=True)
    class Top:
        sub: Knobbed = knob(factory=Knobbed)

    with pytest.raises(ConfigError, match=r"^.*k\.yaml: sub\.size=0 must be >= 1$"):
        load(Top, path)
    with pytest.raises(ConfigError, match="key 'sub.old_size' has moved: use 'sub.size'"):
        load(Top, None, ["sub.old_size=3"])
    with pytest.raises(ConfigError, match=r"^config: key 'sub.speed' was removed: `fast` decides it$"):
        load(Top, None, ["sub.speed=3"])


def test_a_knob_reused_in_another_config_keeps_its_default_and_help():
    @dataclass(frozen=True)
    class Other:
        size: int = knob_of(Knobbed, "size")
        inner: Inner = knob_of(Knobbed, "inner")

    fields = {f.name: f for f in dataclasses.fields(Other)}
    assert (fields["size"].default, fields["size"].metadata["help"]) == (4, "how many")
    assert fields["inner"].metadata["help"] == "a nested section" and Other().inner == Inner()


def test_given_keys_record_what_the_user_set():
    cfg = load(Knobbed, None, ["size=5", "inner.lr=1e-3"])
    assert cfg.given_keys == {"size", "inner"} and to_dict(cfg, given_only=True) == {
        "size": 5, "inner": {"lr": 1e-3, "categories": ["MaybeKnown"], "mode": "a"}}
    changed = with_values(cfg, mode="b")
    assert changed.mode == "b" and changed.given_keys == {"size", "inner", "mode"}
    assert "given_keys" not in to_dict(cfg)


def test_flags_come_from_the_fields():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, Knobbed, exclude=("inner",))
    assert "how many (default: 4)" in parser.format_help()
    args = parser.parse_args(["--size", "7", "--fast", "--resume"])
    assert given_arguments(args, Knobbed) == {"size": "7", "fast": True, "resume": "true"}
    cfg = from_dict(Knobbed, given_arguments(args, Knobbed))
    assert (cfg.size, cfg.fast, cfg.resume, cfg.mode) == (7, True, True, "a")
    assert given_arguments(parser.parse_args([]), Knobbed) == {}  # flags not given do not override a file
    assert from_dict(Knobbed, given_arguments(parser.parse_args(["--resume", "/ckpt"]), Knobbed)).resume == "/ckpt"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(ConfigError, match="size=0 must be >= 1"):
        from_dict(Knobbed, given_arguments(parser.parse_args(["--size", "0"]), Knobbed))
