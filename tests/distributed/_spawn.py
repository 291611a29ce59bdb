"""Run a function on ``world`` freshly spawned gloo ranks, with a deadline (no test hangs)."""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: What a rank reports when it exits without a result (``os._exit`` in fault tests).
NO_RESULT = "<no result>"


def _entry(fn, rank: int, world: int, init: str, results, args) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)  # torch.empty is NaN-filled, as in the test suite
    torch.manual_seed(0)
    os.environ["ATTNKIT_TUNE"] = "off"
    try:
        dist.init_process_group(
            "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        # plain pickle copies tensors into the message (the queue would share their memory,
        # which dies with this process)
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # report everything to the parent, which re-raises
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, deadline: float = 120.0) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own process.

    Returns ``(status, value)`` per rank: ``("ok", pickled result)`` (see :func:`values`),
    ``("error", traceback text)``, or ``("none", NO_RESULT)`` for a rank that exited without
    a result.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init, results, args)) for r in range(world)]
        for p in procs:
            p.start()
        got: dict[int, tuple[str, object]] = {}
        try:
            while len(got) < world:
                try:
                    rank, status, value = results.get(timeout=1.0)
                    got[rank] = (status, value)
                except queue.Empty:
                    if all(not p.is_alive() for p in procs) and results.empty():
                        break
                    deadline -= 1.0
                    if deadline <= 0:
                        raise TimeoutError(
                            f"ranks {sorted(set(range(world)) - set(got))} did not finish"
                        ) from None
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [got.get(r, ("none", NO_RESULT)) for r in range(world)]


def values(outcomes: list) -> list:
    """The results of ranks that all succeeded; raise with the first failure's traceback."""
    for rank, (status, value) in enumerate(outcomes):
        if status != "ok":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
    return [pickle.loads(value) for _, value in outcomes]
