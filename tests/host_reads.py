"""`python tests/host_reads.py OUT.json ARGS` is `python safeclip.py ARGS`, recording every read of a
device tensor back to the host that the training steps make: on a GPU each one is a sync that
drains the GPU's queue. Used by tests/test_gpu_never_waits.py; under torchrun each rank writes
OUT.json.RANK.

On the CPU every tensor lives on the CPU, so "on the device" is traced: a tensor is on the device
when it is a parameter, when safeclip's code moved it there (`.to(device)`, `to_device`), when it
went through a collective (NCCL takes only device tensors), or when it was computed from such a
tensor. A read is a data-dependent operation on one: `.item()`, `.tolist()`, `.cpu()`, `nonzero`,
indexing with a boolean mask, `masked_select` and the like. Reads in the log flush, validation and
checkpoints are the loop's by design and are not recorded; neither are those of `trim_padding`,
whose ids are host data (the step trims them before they move; `encode_text` trims only ids that
are on the CPU, which every id is here).
"""

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeclip  # noqa: E402

class TensorSet:
    """Tensors by identity, forgotten when they die (a WeakSet would compare tensors with ==)."""

    def __init__(self):
        self.refs = {}

    def add(self, t):
        key = id(t)
        self.refs[key] = weakref.ref(t, lambda _, key=key: self.refs.pop(key, None))

    def discard(self, t):
        self.refs.pop(id(t), None)

    def __contains__(self, t):
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t


on_device = TensorSet()
reads, phase = [], {"in_step": False, "step": 0}
aten = torch.ops.aten
DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
                  aten.repeat_interleave.Tensor, aten.masked_scatter.default, aten.unique_consecutive.default}
EXCUSED = {"trim_padding"}


def tensors(tree):
    for x in torch.utils._pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            yield x


def where():
    frame, names = sys._getframe(2), []
    while frame is not None:
        if frame.f_code.co_filename == safeclip.__file__:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def record(what):
    names = where()
    if phase["in_step"] and not EXCUSED & set(names):
        reads.append({"step": phase["step"], "read": what, "in": names[:3]})


class Trace(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(tensors((args, kwargs)))
        device = any(isinstance(t, torch.nn.Parameter) or t in on_device for t in inputs)
        boolean_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in torch.utils._pytree.tree_leaves(args[1]))
        if device and (func in DATA_DEPENDENT or boolean_index):
            record(str(func))
        out = func(*args, **kwargs)
        if device or func.namespace == "c10d":  # collectives take device tensors only
            for t in [*tensors(out), *(inputs if func.namespace == "c10d" else [])]:
                on_device.add(t)
        return out


def marking(name):
    real = getattr(torch.Tensor, name)

    def method(self, *args, **kwargs):
        caller = sys._getframe(1).f_code
        if name in ("to",) and caller.co_filename == safeclip.__file__:
            out = real(self, *args, **kwargs)
            on_device.add(out)
            return out
        if name in ("cpu", "tolist", "numpy", "__float__", "__bool__", "__int__") and self in on_device:
            record(name)
        if name == "cpu":  # a host copy: what is computed from it stays on the host (on the CPU .cpu() is self)
            out = torch.Tensor.clone(self)
            on_device.discard(out)
            return out
        return real(self, *args, **kwargs)
    return method


for name in ("to", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__"):
    setattr(torch.Tensor, name, marking(name))
real_to_device = getattr(safeclip, "to_device", None)


def to_device(x, device):
    out = real_to_device(x, device)
    on_device.add(out)
    return out


if real_to_device is not None:
    safeclip.to_device = to_device


def in_step(function):
    def wrapped(*args, **kwargs):
        phase["in_step"] = True
        try:
            return function(*args, **kwargs)
        finally:
            phase["in_step"] = False
    return wrapped


def outside_step(function):
    def wrapped(*args, **kwargs):
        was, phase["in_step"] = phase["in_step"], False
        try:
            return function(*args, **kwargs)
        finally:
            phase["in_step"] = was
    return wrapped


safeclip.forward_backward = in_step(safeclip.forward_backward)
safeclip.update = in_step(safeclip.update)
real_after_step = safeclip.Run.after_step


def after_step(self, *args, **kwargs):
    phase["step"] = self.step + 1
    return in_step(real_after_step)(self, *args, **kwargs)


safeclip.Run.after_step = after_step
for name in ("flush", "validate_and_select", "save_checkpoint"):
    setattr(safeclip.Run, name, outside_step(getattr(safeclip.Run, name)))

out = sys.argv[1] + (f".{os.environ['RANK']}" if "RANK" in os.environ else "")
if sys.argv[2:3] == ["--each"]:
    # `host_reads.py OUT.json --each RUNS.json`: each argument list of RUNS.json in turn, in this
    # one process (one start of Python and torch instead of one per run); OUT.json gets the list
    # of each run's reads, and the first failing run's exit status ends it.
    results = []
    for argv in json.loads(Path(sys.argv[3]).read_text()):
        reads.clear()
        phase.update(in_step=False, step=0)
        with Trace():
            code = safeclip.main(argv)
        if code:
            sys.exit(code)
        results.append(list(reads))
    Path(out).write_text(json.dumps(results))
    sys.exit(0)
with Trace():
    code = safeclip.main(sys.argv[2:])
Path(out).write_text(json.dumps(reads))
sys.exit(code)
