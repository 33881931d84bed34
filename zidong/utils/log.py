"""Logging and progress bars that only the main process (rank 0) prints through.

Every command uses `get_logger(__name__)` and `progress(...)`; under torchrun / accelerate launch the other
ranks stay quiet, so a 64-GPU run prints one log, not 64. The rank comes from the launcher's environment
(`RANK`), so this works before any process group exists and without importing torch.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_ROOT = "zidong"
LOG_LEVEL_ENV = "ZIDONG_LOG_LEVEL"
PROGRESS_ENV = "ZIDONG_PROGRESS"


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


EVERY_RANK = {"every_rank": True}
"""Pass as `extra=` for a message that every rank prints (about data only that rank reads, say)."""


class _MainProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "every_rank", False):
            record.msg = f"[rank {process_rank()}] {record.msg}"
            return True
        return is_main_process()


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so that a log line never tears a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def get_logger(name: str = _ROOT) -> logging.Logger:
    """A logger under the `zidong` hierarchy that prints to stderr on rank 0 only.

    The level is INFO unless the environment variable ZIDONG_LOG_LEVEL says otherwise (DEBUG, WARNING, ...).
    """
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = _TqdmHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler.addFilter(_MainProcessFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
        root.propagate = False
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def progress(
    iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None, **kwargs: Any
) -> tqdm:
    """A tqdm progress bar shown on rank 0 only; ZIDONG_PROGRESS=0 hides it everywhere (e.g. in batch jobs)."""
    hidden = not is_main_process() or os.environ.get(PROGRESS_ENV, "1") == "0"
    return tqdm(iterable, total=total, desc=desc, disable=hidden, dynamic_ncols=True, **kwargs)
