"""The file half of a store: spooled update blobs, checkpoints and partial aggregates.

Both stores (:mod:`server.store.sqlite`, :mod:`server.store.postgres`) keep blobs as files in
a *spool directory* (the run directory unless ``store.spool_dir`` says otherwise) and only
their path (relative to that directory), sha256 and size in the database::

    updates/r{round}/{client}.bin          accepted update blobs exactly as received
    checkpoints/global_r{round}.safetensors
    partials/r{round}/{worker}.safetensors ingest workers' partial aggregates

A file is written to a temporary name, fsynced, renamed and its directory fsynced before the
row that names it is committed, so a row always points at a complete file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from hfedmoe.errors import DiskFullError, StoreError


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically and durably (temporary file, fsync, rename,
    fsync of the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                ) -> bytes:
    """A canonical state as safetensors bytes (sorted keys, contiguous CPU tensors)."""
    tensors = {k: state[k].detach().contiguous().cpu() for k in sorted(state)}
    return st_save(tensors, metadata=dict(metadata or {}))


def read_checked(path: Path, sha256: str, what: str) -> bytes:
    """The bytes at ``path``; StoreError unless they hash to ``sha256``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: {what} unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"{path}: {what} content does not match its recorded sha256")
    return data


@dataclass(frozen=True)
class StoredUpdate:
    round_idx: int
    client_id: str
    path: Path
    sha256: str
    num_bytes: int
    num_examples: int
    late: bool


def tree_bytes(*roots: Path) -> int:
    """Bytes of the files under ``roots`` (each counted once)."""
    seen = {r.resolve() for r in roots}
    return sum(p.stat().st_size for r in seen if r.exists() for p in r.rglob("*") if p.is_file())


def check_room(spool_dir: Path, used: int, nbytes: int, min_free_bytes: int,
               quota: int) -> None:
    """Raise :class:`DiskFullError` unless ``nbytes`` more leave ``min_free_bytes`` free on
    the spool's disk and keep ``used`` within ``quota`` (0: no quota)."""
    free = shutil.disk_usage(spool_dir).free
    if free - nbytes < min_free_bytes:
        raise DiskFullError(f"{spool_dir}: {free / 2**20:.0f} MiB free; storing "
                            f"{nbytes / 2**20:.1f} MiB more would leave less than "
                            f"{min_free_bytes / 2**20:.0f} MiB")
    if quota and used + nbytes > quota:
        raise DiskFullError(f"{spool_dir}: {used / 2**20:.1f} MiB used; storing "
                            f"{nbytes / 2**20:.1f} MiB more would pass the run "
                            f"directory's quota of {quota / 2**20:.0f} MiB")


def prune_update_files(spool_dir: Path, done_round: int) -> int:
    """Delete the spooled updates of rounds up to ``done_round``; returns the bytes freed."""
    freed = 0
    for folder in (spool_dir / "updates").glob("r*"):
        if folder.name[1:].isdigit() and int(folder.name[1:]) <= done_round:
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    return freed
