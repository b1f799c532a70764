"""`python tests/count_decodes.py OUT ARGS` is `python safeclip.py ARGS`, writing to OUT.RANK how many
images this process decoded in each validation. Used by tests/test_gpu_never_waits.py."""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402

counts, validating, real_open, real_validate = [], [False], safeclip.open_image, safeclip.validate


def open_image(path):
    if validating[0]:
        counts[-1] += 1
    return real_open(path)


def validate(*args, **kwargs):
    counts.append(0)
    validating[0] = True
    try:
        return real_validate(*args, **kwargs)
    finally:
        validating[0] = False


safeclip.open_image = open_image


safeclip.validate = validate
code = safeclip.main(sys.argv[2:])
pathlib.Path(f"{sys.argv[1]}.{os.environ.get('RANK', 0)}").write_text(json.dumps(counts))
sys.exit(code)
