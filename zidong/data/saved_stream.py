"""A checkpoint's data-stream states, read back by each process only as far as it needs them.

Every process saves its whole stream state (`data-rank{r}.json`: cursors, and the sample references its slots had
drawn and not yet handed out, tens of thousands per slot with large batches and bucketing pools), and rank 0
saves one summary of every slot (`data-layout.json`, format `LAYOUT_FORMAT`: cursors and counts, a few hundred
bytes per slot; zidong.data.resplit.summarize). A process resuming on the same layout reads its own file. On
another layout it reads the summaries, computes its own share of the re-split, and reads only the saved states
that share takes references from (one or two when the new layout has at least as many slots). So no process
reads every process's file: at N ranks that would be N^2 reads of a shared file system. A checkpoint written
without `data-layout.json` (before it existed) is summarised from every rank's file, as it was then.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zidong.data.resplit import summarize
from zidong.errors import UserError

RANK_FILE = "data-rank{rank}.json"
LAYOUT_FILE = "data-layout.json"
LAYOUT_FORMAT = "zidong-stream-layout/1"
_RANK_FILE = re.compile(r"^data-rank(\d+)\.json$")


def layout_entry(state: dict[str, Any]) -> dict[str, Any]:
    """What `data-layout.json` keeps of one process's stream state (`StreamLoader.state_dict()`)."""
    sources = len(state.get("signature", {}).get("sources", []))
    return {
        "format": state.get("format"),
        "signature": state.get("signature"),
        "workers": [summarize(worker, sources) for worker in state.get("workers", [])],
    }


def write_layout(folder: Path, entries: list[dict[str, Any]]) -> None:
    """`data-layout.json`: every process's `layout_entry`, in rank order."""
    (folder / LAYOUT_FILE).write_text(json.dumps({"format": LAYOUT_FORMAT, "ranks": entries}))


class SavedStreams:
    """The stream states of the processes that wrote a checkpoint (or were handed over in memory), read lazily.

    `rank(r)` is process r's whole state; `layout()` every process's `layout_entry`; `slot(s)` the whole saved
    state of slot s. Each file is read at most once."""

    def __init__(
        self,
        ranks: int,
        read_rank: Callable[[int], dict[str, Any]],
        read_layout: Callable[[], list[dict[str, Any]] | None] = lambda: None,
    ):
        self.ranks = ranks
        self._read_rank = read_rank
        self._read_layout = read_layout
        self._states: dict[int, dict[str, Any]] = {}
        self._layout: list[dict[str, Any]] | None = None
        self.files_read = 0  # how many saved files this process has read (the layout file included)

    @classmethod
    def of(cls, states: list[dict[str, Any]]) -> SavedStreams:
        """States held in memory, in rank order (tests, and a caller that kept `state_dict()`s)."""
        return cls(len(states), lambda rank: states[rank])

    @classmethod
    def in_folder(cls, folder: Path) -> SavedStreams:
        """The stream states a checkpoint folder holds (none, when it holds no `data-rank*.json`)."""
        ranks = sorted(int(match.group(1)) for path in folder.iterdir() if (match := _RANK_FILE.match(path.name)))
        if ranks != list(range(len(ranks))):
            raise UserError(
                f"{folder} holds the data-stream states of processes {ranks}, not of 0 to {len(ranks) - 1}: the "
                "checkpoint is incomplete. Resume from an earlier checkpoint (resume=PATH)"
            )

        def read_layout() -> list[dict[str, Any]] | None:
            path = folder / LAYOUT_FILE
            if not path.is_file():
                return None
            content = _read_json(path)
            if content.get("format") != LAYOUT_FORMAT or len(content.get("ranks", [])) != len(ranks):
                raise UserError(f"{path} is not the data-stream layout of this checkpoint ({LAYOUT_FORMAT})")
            return content["ranks"]

        return cls(len(ranks), lambda rank: _read_json(folder / RANK_FILE.format(rank=rank)), read_layout)

    def __len__(self) -> int:
        return self.ranks

    def rank(self, rank: int) -> dict[str, Any]:
        if rank not in self._states:
            self._states[rank] = self._read_rank(rank)
            self.files_read += 1
        return self._states[rank]

    def layout(self) -> list[dict[str, Any]]:
        if self._layout is None:
            self._layout = self._read_layout()
            if self._layout is None:  # a checkpoint from before data-layout.json: every process's own file
                self._layout = [layout_entry(self.rank(rank)) for rank in range(self.ranks)]
            else:
                self.files_read += 1
        return self._layout

    def slot(self, slot: int) -> dict[str, Any]:
        """The whole saved state of slot `slot` (process slot // workers of the saved layout)."""
        workers = self.layout()[0]["signature"]["workers"]
        rank = slot // workers
        found = [worker for worker in self.rank(rank).get("workers", []) if worker.get("slot") == slot]
        if not found:
            raise UserError(
                f"the data-stream state of process {rank} holds no reader slot {slot}, which the checkpoint's "
                "data-layout.json lists for it: the checkpoint is damaged. Resume from an earlier checkpoint (resume=PATH)"
            )
        return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"cannot read the data-stream state {path}: {err}. The checkpoint is damaged: resume from an earlier "
            "one (resume=PATH)"
        ) from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a data-stream state (a JSON object). Resume from an earlier checkpoint")
    return content
