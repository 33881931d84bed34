"""Counting the reads of tensor values by the host that zidong's own code makes: the calls that wait for an
accelerator (a CUDA stream sync) when the tensor lives there.

On CPU nothing waits, so this counts the calls themselves, made from a file of the zidong package: `.item()`,
`bool()` / `int()` / `float()` of a tensor, `.tolist()`, `.numpy(force=True)`, `nonzero`, indexing with a boolean
mask (its size is the mask's count), `masked_select`, `unique`, `repeat_interleave`. Reads made inside torch,
Accelerate or transformers are theirs (on CPU the optimizer reads its step counter, which on a GPU lives on the host
too). `Tensor.numpy()` is not counted: it refuses an accelerator tensor, so where it works the tensor is on the
host. Nor is `.cpu()`: on CPU it cannot tell the collated batch (already on the host) from a device tensor, so
zidong reads device values into numpy with `numpy(force=True)`, which is counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import zidong

PACKAGE = str(Path(zidong.__file__).parent)
READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.Tensor.repeat_interleave,
    torch.repeat_interleave,
}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}


def _boolean_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    pieces = index if isinstance(index, tuple | list) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool and p.ndim > 0 for p in pieces)


class HostReads(TorchFunctionMode):
    """`with HostReads() as reads: ...`; then `reads.sites` counts `file:line` of each read in zidong's code."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        forced = func is torch.Tensor.numpy and (kwargs or {}).get("force")
        if func in READS or forced or (func in INDEXING and _boolean_index(args)):
            site = self._zidong_caller()
            if site:
                self.sites[site] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _zidong_caller() -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(PACKAGE):
                return f"{Path(filename).relative_to(PACKAGE).as_posix()}:{frame.f_lineno}"
            if "/torch/" not in filename and not filename.endswith("host_reads.py"):
                return None  # another library's (or the test's) own read
            frame = frame.f_back
        return None

    @property
    def total(self) -> int:
        return sum(self.sites.values())
