"""tga/train/run_lock.py

One run at a time per output folder. A run claims `OUTPUT_DIR/tga_run.lock` before it writes anything there and
removes it when it ends (normal end, exception, the `TrainingStopped` exit, interpreter exit); a second run into the
same folder is refused with a `ConfigError` naming `--output_dir` and the owner's host, PID and start time.

The lock is a small JSON record: host, pid, the process start time (psutil, so a reused pid is not mistaken for the
owner), SLURM job id and restart count, start time and a heartbeat that a daemon thread of the owner rewrites in
place every `HEARTBEAT_S`. A crashed run's lock is stale and taken over with a warning:
- same host: the owner process is gone, or its pid now belongs to a process with another start time;
- another host (processes cannot be checked): the heartbeat is older than `STALE_AFTER_S` (hosts' clocks are
  assumed to agree within a minute, as NTP keeps them);
- the same SLURM job id with another restart count: an earlier incarnation of a requeued job.

Creating the lock is atomic on local disks and NFS: the record is written to a temporary file that is then
hard-linked to the lock name (fails if the name exists; the record is complete the moment it appears). A stale lock
is removed only by the run that creates its break marker (named after the stale claim, created the same way), which
then claims the name like any run: of several runs taking over one stale lock exactly one wins.

Under torch.distributed only global rank 0 claims (the folder is shared by every node) and broadcasts the outcome,
so every rank raises the same `ConfigError` and none waits in a collective.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import psutil
import torch

from tga.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = "tga_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
RECORD_BYTES = 1024  # records (~350 bytes) are padded to one size: a heartbeat overwrites all of one in one write
START_TOLERANCE_S = 1.0  # psutil's start time is boot time + ticks; boot time moves when the clock is stepped
BREAK_STALE_S = 60.0  # a break marker lives for milliseconds; one older than this belongs to a run that crashed
CLAIM_TRIES = 50


@dataclass(frozen=True)
class Owner:
    """Who holds a lock (one claim of one process)."""

    host: str
    pid: int
    process_start: float  # psutil create_time of the pid
    started_at: float  # wall clock when the lock was claimed
    heartbeat: float  # wall clock of the last heartbeat
    slurm_job_id: str | None
    slurm_restart_count: str | None
    token: str  # unique per claim

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.started_at))
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}, started {started}{job}"


def this_process() -> Owner:
    now = time.time()
    return Owner(host=socket.gethostname(), pid=os.getpid(), process_start=psutil.Process().create_time(),
                 started_at=now, heartbeat=now, slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                 slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT"), token=uuid.uuid4().hex)


def encode(owner: Owner, size: int = RECORD_BYTES) -> bytes:
    return json.dumps(asdict(owner)).encode().ljust(size) + b"\n"


def read_owner(path: str) -> Owner | None:
    """The lock's owner; None if there is no lock. A record that does not parse (not written by this module) stands
    for an unknown owner whose heartbeat is the file's modification time."""
    for attempt in range(3):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        try:
            return Owner(**json.loads(data))
        except (ValueError, TypeError):
            time.sleep(0.05 * (attempt + 1))
    return Owner(host="unknown (unreadable lock file)", pid=-1, process_start=0.0, started_at=mtime, heartbeat=mtime,
                 slurm_job_id=None, slurm_restart_count=None, token="")


def link_record(path: str, owner: Owner) -> bool:
    """Create `path` holding `owner`'s complete record, atomically also on NFS: written under a temporary name, then
    hard-linked; False if `path` exists. No file stays open, so an NFS client never keeps an unlinked open file under
    a `.nfs*` name in the folder."""
    temporary = f"{path}.{owner.token}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, encode(owner))
        os.fsync(fd)
        try:
            os.link(temporary, path)
        except OSError as error:  # NFS may report a retried link that did succeed: the link count tells
            if os.fstat(fd).st_nlink != 2:
                if error.errno != errno.EEXIST:
                    raise
                return False
        return True
    finally:
        os.close(fd)
        os.unlink(temporary)


def process_gone(pid: int, process_start: float) -> str | None:
    """Why process `pid` started at `process_start` no longer runs on this host; None while it runs."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited"
        if abs(process.create_time() - process_start) > START_TOLERANCE_S:
            return f"pid {pid} now belongs to another process"
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.AccessDenied:  # another user's live process
        return None
    return None


def stale_reason(owner: Owner, me: Owner, now: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why `owner`'s lock is stale, as seen by `me`; None while its run may still be going."""
    if (owner.slurm_job_id and owner.slurm_job_id == me.slurm_job_id
            and owner.slurm_restart_count != me.slurm_restart_count):
        return f"an earlier incarnation of the requeued SLURM job {owner.slurm_job_id}"
    if owner.host == me.host:
        return process_gone(owner.pid, owner.process_start)
    if now - owner.heartbeat > stale_after_s:
        return f"no heartbeat for {now - owner.heartbeat:.0f} s (more than {stale_after_s:.0f} s)"
    return None


class RunLock:
    """The lock of one output folder, held by this process between `acquire` and `release`."""

    def __init__(self, output_dir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.owner: Owner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Claim the folder, taking a stale lock over; a `ConfigError` naming the owner if a live run holds it."""
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            for _ in range(CLAIM_TRIES):  # each round creates the lock, refuses, or saw the lock change meanwhile
                me = this_process()
                if self._create(me):
                    return
                owner = read_owner(self.path)
                if owner is None:
                    continue
                reason = stale_reason(owner, me, time.time(), self.stale_after_s)
                if reason is None:
                    raise ConfigError(self.refusal(owner))
                if self._break(owner, me):
                    logger.warning("--output_dir %s: taking over the lock of a run that is gone (%s): %s",
                                   self.output_dir, owner.describe(), reason)
        except OSError as error:
            raise ConfigError(f"--output_dir {self.output_dir} is not writable (the run lock {self.path}: "
                              f"{error.strerror or error})") from error
        raise ConfigError(f"--output_dir {self.output_dir}: {self.path} changed {CLAIM_TRIES} times while this run "
                          "tried to claim it (several runs starting into this folder?); choose another --output_dir")

    def refusal(self, owner: Owner) -> str:
        age = time.time() - owner.heartbeat
        return (f"--output_dir {self.output_dir} is in use by another run ({owner.describe()}; last heartbeat "
                f"{age:.0f} s ago; lock file {self.path}). Wait for that run to end or choose another --output_dir. "
                f"The lock is taken over automatically once its process is gone (same host), its heartbeat is older "
                f"than {self.stale_after_s:.0f} s (another host) or it is an earlier run of the same SLURM job; if "
                f"you are sure no run uses this folder, delete {self.path}")

    def _create(self, me: Owner) -> bool:
        """Claim the lock name for `me` and start its heartbeat; False if the name exists."""
        if not link_record(self.path, me):
            return False
        self.owner = me
        atexit.register(self.release)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="tga-run-lock-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _break(self, stale: Owner, me: Owner) -> bool:
        """Remove the stale lock; True if this run did. Only the run that creates the stale lock's break marker
        may move it, after checking it is still there, so a fresh lock is never moved by a run that came late."""
        marker = f"{self.path}.break-{stale.token or 'unreadable'}"
        if not link_record(marker, me):  # another run is breaking it (or crashed doing so: then its marker is stale too)
            breaker = read_owner(marker)
            if breaker is not None and stale_reason(breaker, me, time.time(), BREAK_STALE_S):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
            time.sleep(0.05)
            return False
        try:
            current = read_owner(self.path)
            if current is None or current.token != stale.token:
                return False
            aside = f"{self.path}.stale-{me.token}"
            os.rename(self.path, aside)
            os.unlink(aside)
            return True
        except FileNotFoundError:  # its owner was alive after all and has just removed it
            return False
        finally:
            os.unlink(marker)

    def holds(self) -> bool:
        """Whether the lock file is this claim's (tokens, not inode numbers: a freed inode number is reused)."""
        current = read_owner(self.path)
        return self.owner is not None and current is not None and current.token == self.owner.token

    def _beat(self) -> None:
        lost = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                fd = os.open(self.path, os.O_RDWR)
            except OSError:
                fd = None
            try:  # the token is checked in the very file that is written
                if fd is not None and self.owner.token.encode() in os.pread(fd, RECORD_BYTES + 1, 0):
                    self.owner = replace(self.owner, heartbeat=time.time())
                    os.pwrite(fd, encode(self.owner), 0)
                    os.fsync(fd)
                elif not lost:
                    lost = True
                    logger.warning("--output_dir %s: this run's lock %s is gone or was taken over by another run",
                                   self.output_dir, self.path)
            except OSError as error:
                logger.warning("--output_dir %s: cannot refresh the lock's heartbeat (%s)", self.output_dir, error)
            finally:
                if fd is not None:
                    os.close(fd)

    def release(self) -> None:
        """Remove the lock if this process holds it; a lock taken over by another run is left alone."""
        if self._thread is None or self.owner.pid != os.getpid():  # not claimed, or a forked child: nothing to do
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            if self.holds():
                os.unlink(self.path)
        except OSError as error:
            logger.warning("--output_dir %s: cannot remove the lock %s (%s)", self.output_dir, self.path, error)
        finally:
            self._thread = None
            atexit.unregister(self.release)


def global_rank() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def from_rank0(message: str | None) -> str | None:
    """Rank 0's `message` on every rank (a broadcast when a process group of several ranks is up)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def claim_output_dir(output_dir: str, **settings) -> Iterator[RunLock]:
    """Hold the output folder's lock inside the block (global rank 0 claims; every rank raises if it is refused).

    Call it once the process group is up (the Trainer's arguments start it in multi-rank runs): without one, a rank
    other than 0 cannot learn the outcome and goes on, to be ended by the launcher when rank 0 fails.

    Args:
        output_dir: the run folder (`--output_dir`).
        settings: `heartbeat_s`, `stale_after_s` of `RunLock`.
    """
    lock = RunLock(output_dir, **settings)
    refused, unexpected = None, None
    if global_rank() == 0:
        try:
            lock.acquire()
        except ConfigError as error:
            refused = str(error)
        except Exception as error:  # a bug, not a refusal: told to the other ranks, then raised here
            refused, unexpected = f"rank 0 could not claim --output_dir {output_dir}: {error!r}", error
    refused = from_rank0(refused)
    if unexpected is not None:
        raise unexpected
    if refused is not None:
        raise ConfigError(refused)
    try:
        yield lock
    finally:
        lock.release()
