"""Full-parameter SFT under the `deepspeed` launcher (ZeRO-1/2): `python -m toolkit.train`, or
`gradual train`, which validates the run and starts the launcher. Layout: config (TrainConfig),
dsconfig (ds_config resolution, batch arithmetic, memory estimate), data (SFT tokenisation, batch
plan), plan (every check before the process group, the dry run), strategy (the DeepSpeed object),
evaluate (greedy exact match), loop (the training loop), launch (`gradual train`), prebuild."""

from .config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config"]
