"""Running over several processes and devices: torchrun ranks, batch sharding, merging, checkpoints.

* :class:`Ranks` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``); without torchrun it is one process of rank 0.
* :func:`shard` cuts the data into the batches one process would form (consecutive runs of
  ``batch_size`` items, the last one shorter) and deals them out *strided*: rank ``r`` of ``W`` takes
  batches ``r, r + W, r + 2W, ...``. Every item therefore sits in the same batch, with the same padding,
  as in a one-process run, so per-item answers are bitwise those of one process (on a deterministic
  device), and the profile sums differ only by the order of float64 additions.
* :func:`process_group` initialises ``torch.distributed`` from torchrun's ``env://`` rendezvous (NCCL
  when the model runs on CUDA, gloo otherwise); :func:`gather_profile` merges every rank's
  :class:`~skipit_core.capture.LayerProfile` on rank 0 (``gather_object`` of the profiles, then
  :meth:`LayerProfile.merge` in rank order: sums add, min/max combine); :func:`gather_items` puts
  per-item results of every rank back in the data's order on rank 0.
* :class:`Checkpoint` is one rank's resumable state: the partial profile (:meth:`LayerProfile.save`)
  with the count of batches and samples done and the arguments of the run in its metadata, written to
  a temporary file and renamed over the old one (atomic), so a run killed at any moment leaves either
  the previous checkpoint or the new one.
* :func:`execution_device` is the device inputs go to, also for a model dispatched by accelerate
  (``device_map``) whose first parameters are offloaded (``meta``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .capture import LayerProfile
from .errors import InputError
from .forward import execution_device  # noqa: F401  (re-exported: where inputs go)

__all__ = ["Ranks", "shard", "batch_starts", "process_group", "gather_profile", "gather_items", "Checkpoint",
           "execution_device"]


# ------------------------------------------------------------------------------------------- ranks
def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isascii() or not text.isdigit():
        raise InputError(f"environment variable {name}={text!r} is not a non-negative integer; launch with "
                         "torchrun, or unset RANK/WORLD_SIZE/LOCAL_RANK for one process.")
    return int(text)


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (``local_*``: on this machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """torchrun's variables; one process of rank 0 when they are unset."""
        world = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world or not 0 <= local < max(local_world, 1):
            raise InputError(f"RANK={rank}, LOCAL_RANK={local} and WORLD_SIZE={world} do not fit together; "
                             "launch with torchrun, which sets them.")
        return cls(rank, world, local, local_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, requested: str | None) -> str:
        """The device of this rank's model: ``requested`` (``cuda`` becomes ``cuda:<local_rank>`` under
        torchrun), else ``cuda:<local_rank>`` when CUDA is there, else ``cpu``."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and (self.distributed or torch.cuda.device_count() > 1):
            return f"cuda:{self.local_rank}"
        return requested


# ---------------------------------------------------------------------------------------- sharding
def batch_starts(n_items: int, batch_size: int) -> list[int]:
    """First item of every batch a one-process run forms."""
    return list(range(0, n_items, batch_size))


def shard(n_items: int, batch_size: int, ranks: Ranks) -> np.ndarray:
    """Indices of the items of rank ``ranks.rank``: its batches (strided), in order.

    Raises :class:`InputError` when there are fewer batches than processes (a rank would get nothing).
    """
    starts = batch_starts(n_items, batch_size)
    if ranks.world > len(starts):
        raise InputError(f"{ranks.world} processes but only {len(starts)} batch(es) of --batch-size {batch_size} "
                         f"in {n_items} items: use at most {len(starts)} process(es) (torchrun --nproc_per_node), "
                         "a smaller --batch-size or more data.")
    mine = starts[ranks.rank::ranks.world]
    return np.concatenate([np.arange(s, min(s + batch_size, n_items)) for s in mine])


# ------------------------------------------------------------------------------------ process group
def _dist():
    return dist


@contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[None]:
    """``torch.distributed`` for the ranks of a torchrun launch (nothing for one process): NCCL when
    ``device`` is CUDA (the current device set to it), else gloo. Always destroyed on the way out."""
    if not ranks.distributed:
        yield
        return
    dist = _dist()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                            rank=ranks.rank, world_size=ranks.world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gather(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 in rank order (``None`` elsewhere); ``[obj]`` for one process."""
    if not ranks.distributed:
        return [obj]
    dist = _dist()
    out = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_profile(prof, ranks: Ranks):
    """The merged :class:`LayerProfile` of all ranks on rank 0 (``None`` on the others)."""
    parts = _gather(prof, ranks)
    if parts is None:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def gather_items(index: Sequence[int], values: Sequence[Any], n_items: int, ranks: Ranks) -> list[Any] | None:
    """Per-item ``values`` of every rank (item ``index[i]`` has ``values[i]``) as one list in data order
    on rank 0 (``None`` elsewhere); every item must come exactly once."""
    parts = _gather((list(map(int, index)), list(values)), ranks)
    if parts is None:
        return None
    out: list[Any] = [None] * n_items
    seen = np.zeros(n_items, dtype=np.int64)
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            out[i] = v
            seen[i] += 1
    if not (seen == 1).all():
        raise InputError(f"ranks returned {int(seen.sum())} results for {n_items} items; every rank must run "
                         "with the same arguments.")
    return out


# -------------------------------------------------------------------------------------- checkpoint
class Checkpoint:
    """Resumable state of one rank's profile in ``folder`` (``profile-rank<r>-of-<W>.npz``).

    ``identity`` are the arguments that decide the result (model, data, ``--n``, ``--batch-size``,
    dtype ...): a checkpoint written with other ones is refused, never mixed in.
    """

    def __init__(self, folder: str | os.PathLike, ranks: Ranks, identity: dict[str, Any]):
        self.folder = Path(folder)
        self.path = self.folder / f"profile-rank{ranks.rank}-of-{ranks.world}.npz"
        self.ranks, self.identity = ranks, dict(identity, world_size=ranks.world)

    def check_folder(self) -> None:
        """Create the folder if missing; refuse a file or an unwritable folder; refuse checkpoints of
        another world size."""
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--checkpoint {self.folder} is a file; give a folder (created if missing).")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"cannot write to --checkpoint folder {self.folder} ({exc.strerror}); "
                             "pick a writable folder.") from None
        for stale in self.folder.glob(self.path.name + ".tmp*"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        others = [p.name for p in self.folder.glob("profile-rank*-of-*.npz") if not p.name.endswith(
            f"-of-{self.ranks.world}.npz")]
        if others:
            raise InputError(f"--checkpoint {self.folder} holds checkpoints of another number of processes "
                             f"({others[0]}); resume with that many processes or use a fresh folder.")

    def load(self):
        """``(profile, batches_done)`` from the checkpoint, ``(None, 0)`` when there is none.

        Raises :class:`InputError` when it was written by a run with other arguments."""
        if not self.path.exists():
            return None, 0
        try:
            prof = LayerProfile.load(self.path)
        except Exception as exc:  # noqa: BLE001 - a damaged file: say so, do not guess
            raise InputError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}); delete it to "
                             "start over.") from None
        state = prof.meta.pop("checkpoint", None) or {}
        stored = state.get("identity", {})
        for key in sorted(set(stored) | set(self.identity)):
            if stored.get(key) != self.identity.get(key):
                flag = "--" + key.replace("_", "-")
                raise InputError(f"--checkpoint {self.folder} was written with {flag} {stored.get(key)!r}, this "
                                 f"run has {self.identity.get(key)!r}: rerun with the same arguments, or use a "
                                 "fresh --checkpoint folder.")
        return prof, int(state["batches_done"])

    def save(self, prof, batches_done: int) -> None:
        """Write ``prof`` with ``batches_done`` atomically (temporary file, fsync, rename)."""
        state = {"identity": self.identity, "batches_done": int(batches_done), "samples_done": int(prof.n_samples)}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        LayerProfile(dict(prof.meta, checkpoint=state), prof.arrays, prof.pooled).save(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
