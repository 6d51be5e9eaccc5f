"""A training rank that records the largest tensor any torch operation creates in it: runs
`python -m toolkit.train` (same arguments) under a dispatch mode that sees every aten op's outputs,
and writes {"max_bytes": ...} to <output_dir>/alloc/rank<R>.json. The ZeRO-3 test's instrument:
a rank that never materialises the full parameter set creates no tensor of the model's size."""
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the hook torch's own tests use for this

from toolkit.train.__main__ import main


class LargestTensor(TorchDispatchMode):
    """The largest storage an op creates (its outputs' storages that are none of its inputs': views
    and in-place results allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.max_bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                if size > self.max_bytes:
                    self.max_bytes, self.op = size, str(func)
        return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    out_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
    with LargestTensor() as seen:
        rc = main(argv)
    path = Path(out_dir) / "alloc" / f"rank{os.environ.get('RANK', 0)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"max_bytes": seen.max_bytes, "op": seen.op}))
    sys.exit(rc)
