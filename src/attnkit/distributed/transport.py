"""The transport under context parallelism: who talks, on which device, and for how long.

:class:`_Group` is a process group as this package uses it: its rank and size, the timeout of
every wait, and the device every tensor it creates lives on (:func:`communication_device`: the
inputs' CUDA device under NCCL, which moves only CUDA tensors; the CPU under gloo).
:class:`_Exchanges` posts point-to-point transfers in batches (one NCCL group each) and waits
for them with that timeout, naming the peer in a :class:`PeerError` when one does not answer.
Everything above (layouts, the ring, all-to-all, the call's agreement) moves data through here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class PeerError(RuntimeError):
    """A peer rank did not answer in time, or its connection failed (it raised or died)."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


#: Tag offsets that keep the ring's key/value, gradient and all-to-all transfers apart.
_GRADIENT_TAGS = 1 << 28


_ALL_TO_ALL_TAGS = 2 << 28


# --------------------------------------------------------------------------- transport
def communication_device(device: torch.device | str | None, group=None) -> torch.device:
    """The device of the small tensors a process group's collectives move (call descriptions,
    lengths, timings, flags): ``device`` (default: the current CUDA device) under NCCL, which
    moves only CUDA tensors; the CPU under every other backend (gloo)."""
    if dist.get_backend(group) == "nccl":
        if device is None:
            return torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(
                f"attnkit.distributed: the process group uses NCCL, which moves only CUDA tensors, "
                f"but the tensors are on device={device}; use the gloo backend for CPU tensors."
            )
        return device
    return torch.device("cpu")


@dataclass(frozen=True)
class _Group:
    """The transport: a process group, this rank, the timeout every wait honours, and the
    device of every tensor the transport itself creates (:func:`communication_device`)."""

    handle: dist.ProcessGroup | None
    rank: int
    size: int
    timeout: datetime.timedelta
    device: torch.device

    @staticmethod
    def of(group, timeout: float | None, device: torch.device | str | None) -> _Group:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "attnkit.distributed: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
            )
        if timeout is None:
            timeout = float(os.environ.get("ATTNKIT_DIST_TIMEOUT", "300"))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(
                f"attnkit.distributed: expected timeout > 0 seconds, but got timeout={timeout!r}."
            )
        return _Group(
            group,
            dist.get_rank(group),
            dist.get_world_size(group),
            datetime.timedelta(seconds=timeout),
            communication_device(device, group),
        )

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (what point-to-point operations take)."""
        return r if self.handle is None else dist.get_global_rank(self.handle, r)

    def tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        """A small message of ``values`` on the transport's device."""
        return torch.tensor(values, dtype=dtype, device=self.device)


def _wait(g: _Group, work, peer: int, what: str) -> None:
    try:
        work.wait(g.timeout)
    except RuntimeError as e:
        raise PeerError(
            f"attnkit.distributed: rank {g.rank} got no answer from rank {peer} during {what} within "
            f"{g.timeout.total_seconds():g} s (rank {peer} raised, died, or is not calling the same "
            f"operation): {str(e).splitlines()[0]}",
            peer,
        ) from e


class _Exchanges:
    """Point-to-point transfers posted ahead and waited for with a timeout that names the peer."""

    def __init__(self, g: _Group, what: str, tag_base: int = 0) -> None:
        self.g, self.what, self.tag_base = g, what, tag_base
        self.pending: dict[int, tuple[object, int, Tensor | None]] = {}
        self._count = 0

    def post(self, send=None, recv=None, step: int = 0, *, more: tuple = ()) -> list[int]:
        """Post ``send = (peer, tensor)``, ``recv = (peer, buffer)`` (either may be None) and
        ``more`` ``("send" | "recv", peer, tensor)`` operations as one batch (one NCCL group,
        so that a pair's sends and receives cannot wait on each other); return handles for
        :meth:`collect`."""
        ops = [
            *(() if recv is None else (("recv", *recv),)),
            *(() if send is None else (("send", *send),)),
            *more,
        ]
        if not ops:
            return []
        g, tag = self.g, self.tag_base + step
        p2p = [
            dist.P2POp(dist.irecv if kind == "recv" else dist.isend, t, g.peer(peer), g.handle, tag)
            for kind, peer, t in ops
        ]
        works = dist.batch_isend_irecv(p2p)
        if len(works) != len(ops):  # one coalesced request stands for the whole batch
            works = [works[-1]] * len(ops)
        handles = []
        for work, (kind, peer, t) in zip(works, ops, strict=True):
            self._count += 1
            self.pending[self._count] = (work, peer, t if kind == "recv" else None)
            handles.append(self._count)
        return handles

    def collect(self, handles: list[int]) -> Tensor | None:
        """Wait for the given transfers; return the buffer received among them, if any."""
        received = None
        for h in handles:
            work, peer, buf = self.pending.pop(h)
            _wait(self.g, work, peer, self.what)
            if buf is not None:
                received = buf
        return received

    def finish(self) -> list[tuple[int, Tensor]]:
        """Wait for everything still pending; return what was received, ``(peer, buffer)``."""
        got = []
        for work, peer, buf in self.pending.values():
            _wait(self.g, work, peer, self.what)
            if buf is not None:
                got.append((peer, buf))
        self.pending = {}
        return got


def _exchange_all(
    g: _Group, chunks: list[Tensor], shape_of, dtype, what: str, tag_base: int = _ALL_TO_ALL_TAGS
) -> list[Tensor]:
    """All-to-all by point-to-point: send ``chunks[r]`` to rank ``r``; return what each rank
    sent here (a buffer of ``shape_of(r)``), in rank order."""
    ex = _Exchanges(g, what, tag_base=tag_base)
    got: list[Tensor] = list(chunks)
    ops = []
    for r in range(g.size):
        if r != g.rank:
            got[r] = torch.empty(shape_of(r), dtype=dtype, device=chunks[0].device)
            ops += [("recv", r, got[r]), ("send", r, chunks[r])]
    ex.post(more=tuple(ops))
    ex.finish()
    return got


def _all_reduce_sum(x: Tensor, g: _Group, what: str) -> Tensor:
    got = _exchange_all(g, [x] * g.size, lambda r: x.shape, x.dtype, what, 5 << 20)
    return torch.stack(got).sum(0)
