"""tga/train/integrity.py

Completion markers with content checksums: what makes a folder a checkpoint (or a final model folder) that may be
trusted.

A marker (`tga_complete.json`) is written last, under a temporary name and renamed, once every rank has written its
files. It lists every file of the folder with its size and SHA-256. A folder counts as complete only if the marker
parses and every listed file is there with its size and checksum: a file cut short, overwritten in place with bytes
of the same size, or replaced by another run's file is found. Hashing is split across the ranks (file i on rank
i mod world size; every rank reads the shared folder), so a 7B ZeRO-3 checkpoint is hashed in the time of one rank's
share. Markers written before checksums existed (sizes only) are still read, with sizes checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "tga_complete.json"
CHUNK = 8 << 20
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def folder_files(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under `folder` (the marker and temporary files excluded)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETE_MARKER and not name.endswith(".tmp") and ".tmp-" not in name:
                files[relative] = os.path.getsize(path)
    return dict(sorted(files.items()))


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shared(results: dict) -> dict:
    """Every rank's part of `results`, merged on every rank (one all-gather; a no-op in one process)."""
    rank, world = _world()
    if world == 1:
        return results
    parts = [None] * world
    torch.distributed.all_gather_object(parts, results)
    return {key: value for part in parts for key, value in part.items()}


def checksums(folder: str, names: list[str], *, sharded: bool = True) -> dict[str, str]:
    """SHA-256 of each named file of `folder`; with `sharded`, every rank of the process group must call this with
    the same names and hashes its share (all ranks get all sums)."""
    rank, world = _world() if sharded else (0, 1)
    mine = {name: sha256(os.path.join(folder, name)) for name in names[rank::world]}
    return _shared(mine) if sharded else mine


def mark_complete(folder: str, global_step: int | None, *, sharded: bool = False, write: bool = True) -> str:
    """Write the completion marker of a fully written folder; returns the marker path.

    Args:
        folder: the checkpoint or model folder.
        global_step: the training step the folder holds (None for a final model folder written outside training).
        sharded: hash the files on every rank of the process group (all ranks must call this).
        write: whether this process writes the marker (rank 0 under `sharded`).
    """
    sizes = folder_files(folder)
    sums = checksums(folder, list(sizes), sharded=sharded)
    marker = os.path.join(folder, COMPLETE_MARKER)
    if write:
        files = {name: {"size": size, "sha256": sums[name]} for name, size in sizes.items()}
        temporary = f"{marker}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"global_step": global_step, "time": time.time(), "files": files}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, marker)  # the marker appears whole or not at all
    return marker


def read_marker(folder: str) -> dict | None:
    """The parsed marker of `folder`, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(folder, COMPLETE_MARKER), encoding="utf-8") as handle:
            marker = json.load(handle)
        return marker if isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def listed(marker: dict) -> dict[str, tuple[int, str | None]]:
    """name -> (size, sha256 or None for a sizes-only marker)."""
    return {name: (entry["size"], entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
            for name, entry in marker["files"].items()}


def verify(folder: str, *, sharded: bool = False, checksum: bool = True) -> str | None:
    """Why `folder` is not a complete, intact folder, or None when it is.

    Args:
        folder: a folder with a completion marker.
        sharded: hash on every rank of the process group (all ranks must call this; all get the same answer).
        checksum: also compare contents (False: sizes only, the cheap check rotation uses).
    """
    marker = read_marker(folder)
    if marker is None:
        return f"no readable {COMPLETE_MARKER} (killed while saving?)"
    try:
        files = listed(marker)
    except (KeyError, TypeError):
        return f"{COMPLETE_MARKER} is malformed"
    for name, (size, _) in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the marker lists {size}"
    if not checksum:
        return None
    hashed = sorted(name for name, (_, digest) in files.items() if digest)
    actual = checksums(folder, hashed, sharded=sharded)
    for name in hashed:
        if actual[name] != files[name][1]:
            return f"{name} does not match its checksum (changed or corrupted after it was written)"
    return None


def is_complete(folder: str, *, checksum: bool = True) -> bool:
    """True when `folder` has a valid marker and every listed file is intact (one process)."""
    return verify(folder, checksum=checksum) is None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder in output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_complete_checkpoint(output_dir: str, checksum: bool = True) -> str | None:
    """The newest checkpoint folder whose marker and files check out (sizes, and checksums unless told), or None."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path, checksum=checksum):
            return path
    return None
