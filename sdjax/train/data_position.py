"""The input position saved with a checkpoint, and its conversion to another process count.

A checkpoint's `data` item is `{"processes": [loader state of process 0, 1, ...], "step": k,
"global_batch": B}` (`sdjax.data.loader` states). A resume with the same layout (process
count, per-process batch, grain workers) restores each process's own state: exact, corrupt
records included.

With another layout the position is converted. The loader's graph gives process p of n the
examples p, p+n, p+2n, ... of one global stream (shuffle and augmentation are keyed on the
stream index, not on the process), so without grain workers global batch k is examples
[kB, (k+1)B) whatever n is. The saved states give the longest prefix of the stream that all
processes had consumed, and each new process starts at its first example past it: exact when
the dataset size is a multiple of both process counts (otherwise the processes' epochs are
not aligned and a few examples at the boundary are read twice). With grain workers a global
batch depends on the layout anyway; the new layout starts where it would be after k steps.
"""

from __future__ import annotations

from sdjax.data.loader import STATE_FORMAT
from sdjax.errors import UserError


def saved_position(process_states: list[dict], step: int, global_batch: int) -> dict:
    return {"processes": process_states, "step": step, "global_batch": global_batch}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b) if a > 0 else 0


def _consumed_prefix(process_states: list[dict]) -> int:
    """Examples of the global stream that every process had read past (no grain workers)."""
    n = len(process_states)
    return min(n * s["grain"]["next_index"] + p for p, s in enumerate(process_states))


def _worker_state(step: int, workers: int, batch: int) -> dict:
    """grain's mp_prefetch state after `step` batches: workers take turns, one batch each."""
    return {
        "next_index_in_cycle": step % workers,
        "next_index_in_datasets": workers,
        "iterators_in_use_indices": list(range(workers)),
        "iterators_in_use_states": [
            {"next_index": _ceil_div(step - w, workers) * batch} for w in range(workers)
        ],
        "exhausted": [0] * workers,
        "future_states": {},
    }


def resume_state(saved: dict, layout: dict, step: int) -> dict:
    """The loader state for this process (`layout`: its loader's) from a checkpoint's
    `data` item saved at `step`."""
    processes = saved["processes"]
    index, count = layout["process_index"], layout["process_count"]
    if len(processes) == count and processes[index].get("layout") == layout:
        return processes[index]
    old = processes[0]["layout"]
    if old["seed"] != layout["seed"]:
        raise UserError(f"data position saved with seed {old['seed']}, not {layout['seed']}")
    if old["worker_count"] == 0 and layout["worker_count"] == 0:
        prefix = _consumed_prefix(processes)
        grain_state = {"next_index": _ceil_div(prefix - index, count)}
    elif layout["worker_count"] == 0:
        grain_state = {"next_index": step * layout["batch_size"]}
    else:
        grain_state = _worker_state(step, layout["worker_count"], layout["batch_size"])
    return {"format": STATE_FORMAT, "layout": dict(layout), "grain": grain_state}
