"""`python tests/rank_view.py ARGS` is `python safeclip.py ARGS`, except that rank 1 of a torchrun
job sees another world, as a process on another node may: the files named in $HIDE_FROM_RANK1
(comma-separated names) do not exist for it, and with $WORSE_VAL_ON_RANK1 its validation loss
rises at every validation. Used by tests/test_cuda_path.py."""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402

if os.environ.get("RANK") == "1":
    hidden = set(filter(None, os.environ.get("HIDE_FROM_RANK1", "").split(",")))
    exists = pathlib.Path.exists
    pathlib.Path.exists = lambda self, *a, **k: self.name not in hidden and exists(self, *a, **k)
    if os.environ.get("WORSE_VAL_ON_RANK1"):
        real, calls = safeclip.validate, []

        def validate(*args, **kwargs):
            metrics = real(*args, **kwargs)
            calls.append(1)
            return {**metrics, "loss": 100.0 + len(calls)}

        safeclip.validate = validate

sys.exit(safeclip.main(sys.argv[1:]))
