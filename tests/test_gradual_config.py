"""The pipeline config: shipped presets and the documented example validate; bad keys are refused."""
import json
from pathlib import Path

import pytest

from toolkit.config import ConfigError
from toolkit.gradual.config import ALL_BASELINES, load_pipeline_config

EXAMPLE = Path(__file__).resolve().parents[1] / "toolkit" / "configs" / "examples" / "own_data.yaml"


def test_presets_and_example_validate():
    default = load_pipeline_config()
    assert default.preset == "default" and default.model is None and default.train.num_accelerators == 1
    paper = load_pipeline_config(preset="paper")
    assert (paper.probe.num_exemplar_sets, paper.probe.shots, paper.probe.samples, paper.probe.temperature) == (10, 4, 16, 0.5)
    example = load_pipeline_config(EXAMPLE)
    assert example.train.hostfile == "/shared/hostfile" and example.seeds == (0, 1, 2)


def test_overrides_and_all_baselines():
    cfg = load_pipeline_config(None, ["probe.samples=2", "baselines=all", "seeds=0,1", "train.options.lr=1e-4"])
    assert cfg.probe.samples == 2 and cfg.baselines == ALL_BASELINES and cfg.seeds == (0, 1)
    assert cfg.train.options["lr"] == "1e-4"  # validated (and converted) by the trainer's own config
    assert cfg.for_seed(1).selection.seed == 1


@pytest.mark.parametrize("overrides,message", [
    (["baselines=fancy"], "unknown baseline 'fancy'"),
    (["seeds=0,0"], "seeds has duplicates"),
    (["probe.splits=train"], "probe.splits must include 'test'"),
    (["probe.engine=turbo"], "unknown engine 'turbo'"),
    (["probe.samples=-1"], "samples must be >= 0"),
    (["probe.seed=3"], "probe.seed is set by the pipeline"),
    (["selection.stage1_categories=Known"], "unknown category 'Known'"),
    (["train.options.model=x"], "train.options.model is set by the pipeline"),
    (["train.options.micro_batch_size=0"], "micro_batch_size=0 must be >= 1"),
    (["train.stage2_lr_factor=0"], "stage2_lr_factor=0.0 must be in (0, 10]"),
    (["data.train_items=0"], "data.train_items=0 must be >= 1"),
    (["probe.shot=3"], "unknown key 'probe.shot'"),
])
def test_bad_pipeline_config(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(None, overrides)
    assert message in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast' .known: default, paper"):
        load_pipeline_config(preset="fast")


def test_run_locked_by_an_older_toolkit_resumes_if_only_new_keys_are_missing(tmp_path):
    from toolkit.config import to_dict
    from toolkit.gradual.pipeline import Pipeline

    cfg = load_pipeline_config(None)
    written = to_dict(cfg)
    del written["probe"]["seed"], written["probe"]["keep_samples"]  # keys this toolkit added later
    (tmp_path / "config.json").write_text(json.dumps(written))
    Pipeline(cfg, tmp_path)._lock_config()  # the same run: accepted
    changed = load_pipeline_config(None, ["probe.samples=3"])
    with pytest.raises(ConfigError, match="probe.samples"):
        Pipeline(changed, tmp_path)._lock_config()
