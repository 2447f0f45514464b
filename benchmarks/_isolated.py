"""Run a benchmark variant in its own spawned process, so its peak RSS and thread state are its own."""

from __future__ import annotations

import multiprocessing as mp


def run_isolated(target, *args) -> dict:
    """Call ``target(*args, queue)`` in a fresh process; return what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
