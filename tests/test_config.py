"""Typed configs: nested YAML, --set overrides, and one clear error per bad key or value."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from toolkit.config import ConfigError, apply_overrides, load, to_dict


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
