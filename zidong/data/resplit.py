"""Resume with another layout: how the slots of a new (processes x workers) layout share what the old slots had
not yet read.

When the checkpoint was written by another number of processes or workers (same sources, seed and shuffle
window), every process reads every process's saved state and computes the same re-split: the samples the old slots
had drawn but not yet handed out, and the rest of each old slot's plan up to the furthest epoch any slot had
reached, are cut into contiguous blocks, one per new slot, which each reads before going on with the next epoch.
So 2 -> 4 -> 1 processes see every sample of the interrupted epoch exactly once, and nothing twice. A changed
source, seed or shuffle window starts the next epoch afresh instead (zidong/data/slots.py says what a slot reads).

A slot's saved state is summarised first (`summarize`: cursors and counts, without the sample references), the
re-split works on the summaries (`resplit`), and each new slot then reads back only the references its share
comes from (`ref_pieces`). zidong/data/saved_stream.py reads the saved states as far as a process needs.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from zidong.data.slots import fresh_state, slot_share


def drawn_refs(state: dict[str, Any], source: int) -> list[list[int]]:
    """The (shard, position) pairs of `source` a slot had drawn and not yet handed out: its pending batches', then
    its deferred ones."""
    refs = [*(ref for batch in state["pending"] for ref in batch), *state["deferred"]]
    return [ref[1:3] for ref in refs if ref[0] == source]


def summarize(state: dict[str, Any], sources: int) -> dict[str, Any]:
    """What a re-split needs of a slot's state, without the sample references it holds (which can be tens of
    thousands): its cursors, with each explicit piece of references given by its length, and how many it had
    drawn per source. `resplit` works on these; `ref_pieces` reads the references back from the whole state."""
    cursors = []
    for cursor in state["sources"]:
        leftover = [{"refs": len(piece["refs"])} if "refs" in piece else piece for piece in cursor.get("leftover", [])]
        cursors.append({**cursor, "leftover": leftover} if leftover else dict(cursor))
    return {
        "slot": state["slot"],
        "sources": cursors,
        "drawn": [len(drawn_refs(state, source)) for source in range(sources)],
    }


def resplit(
    summaries: list[dict[str, Any]], old_slots: int, new_slots: int, totals: list[int], wanted: range
) -> list[dict[str, Any]]:
    """The states of the new slots in `wanted` (of `new_slots`) that continue, together with the other new
    slots, exactly where every old slot (`summaries`, see `summarize`) left.

    Per source, what the old slots had not yet handed out: the refs they had drawn (pending batches, deferred),
    and each one's unread leftover and plan up to the furthest epoch any of them reached, as pieces (explicit
    refs, or a range of an old slot's epoch plan). Each epoch's pieces, earliest first, are cut into `new_slots`
    contiguous blocks, so every new slot reads its share of the interrupted epoch first; its cursor then goes on
    at the furthest epoch + 1. A piece of explicit refs comes back as a reference to where they are
    (`{"drawn": [old slot, source]}` or `{"leftover": [old slot, source, piece]}` with `start` and `stop`), for
    `ref_pieces` to fill in: a slot reads only the saved states its share comes from. The cost grows with the
    number of old slots, not with the samples they hold."""
    summaries = sorted(summaries, key=lambda state: state["slot"])
    states = {slot: fresh_state(slot, len(totals)) for slot in wanted}
    for source, total in enumerate(totals):
        furthest = max(state["sources"][source]["epoch"] for state in summaries)
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        drawn = [
            {"drawn": [state["slot"], source], "start": 0, "stop": state["drawn"][source]}
            for state in summaries
            if state["drawn"][source]
        ]
        if drawn:  # drawn before anything still in the plans
            by_epoch[-1] = drawn
        for state in summaries:
            cursor = state["sources"][source]
            for number, piece in enumerate(cursor.get("leftover", [])):
                if "refs" in piece:
                    piece = {"leftover": [state["slot"], source, number], "start": 0, "stop": piece["refs"]}
                by_epoch.setdefault(piece.get("epoch", -1), []).append(copy.deepcopy(piece))
            share = slot_share(total, state["slot"], old_slots)
            for epoch in range(cursor["epoch"], furthest + 1):
                start = cursor["position"] if epoch == cursor["epoch"] else 0
                if start < share:
                    piece = {"epoch": epoch, "slot": state["slot"], "slots": old_slots, "start": start, "stop": share}
                    by_epoch.setdefault(epoch, []).append(piece)
        blocks: dict[int, list[dict[str, Any]]] = {slot: [] for slot in wanted}
        for turn, epoch in enumerate(sorted(by_epoch)):
            # the cut's longer parts come last; rotating by epoch spreads them over the slots
            parts = {slot: (slot - turn) % new_slots for slot in wanted}
            cut = _cut(by_epoch[epoch], new_slots, parts.values())
            for slot, part in parts.items():
                blocks[slot].extend(cut[part])
        for slot, block in blocks.items():
            cursor = {"epoch": furthest + 1, "position": 0}
            if block:
                cursor["leftover"] = block
            states[slot]["sources"][source] = cursor
    return [states[slot] for slot in wanted]


def ref_pieces(state: dict[str, Any], saved_state: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """`state` (from `resplit`) with each reference to explicit refs replaced by the refs themselves, read from
    `saved_state(old slot)`, the whole saved state of that slot."""
    for cursor in state["sources"]:
        for index, piece in enumerate(cursor.get("leftover", [])):
            if "drawn" in piece:
                slot, source = piece["drawn"]
                refs = drawn_refs(saved_state(slot), source)
            elif "leftover" in piece:
                slot, source, number = piece["leftover"]
                refs = saved_state(slot)["sources"][source]["leftover"][number]["refs"]
            else:
                continue
            cursor["leftover"][index] = {"refs": [list(ref) for ref in refs[piece["start"] : piece["stop"]]]}
    return state


def piece_length(piece: dict[str, Any]) -> int:
    return len(piece["refs"]) if "refs" in piece else piece["stop"] - piece["start"]


def _cut(pieces: list[dict[str, Any]], blocks: int, wanted: Iterable[int]) -> dict[int, list[dict[str, Any]]]:
    """Parts `wanted` of `pieces` (read in order) cut into `blocks` contiguous runs of equal length (±1)."""
    ends = list(itertools.accumulate(piece_length(piece) for piece in pieces))
    total = ends[-1] if ends else 0
    cut: dict[int, list[dict[str, Any]]] = {}
    for block in wanted:
        low, high = block * total // blocks, (block + 1) * total // blocks
        part = cut[block] = []
        index = bisect.bisect_right(ends, low)  # the first piece that ends after `low`
        while index < len(pieces) and low < high:
            piece, offset = pieces[index], ends[index] - piece_length(pieces[index])
            first, last = low - offset, min(high, ends[index]) - offset
            if first == last:  # an empty piece
                pass
            elif "refs" in piece:
                part.append({"refs": piece["refs"][first:last]})
            else:
                part.append({**piece, "start": piece["start"] + first, "stop": piece["start"] + last})
            low = offset + last
            index += 1
    return cut
