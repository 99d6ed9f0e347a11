"""One writer per score log: a lock file in ``mimic_scores/`` naming the run (pid and host) that writes the log.

Two runs in one ``output_dir`` at once would write into the same shards (their names come from the steps), and the
log would hold both runs' records under the same (step, sample). The first run's rank 0 takes the lock when training
starts; a second run is refused, naming the first one's pid and host. A lock whose process no longer runs on this
host (a crashed or killed run) is stale and is taken over with a warning; a lock held by this very process (an earlier
`train` call that raised) is taken over silently; a pid reused by another process is told apart by its start time.
The lock is created with its content in one step (a hard link to a
finished temporary file), so no run ever reads a half-written lock.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "ScoreLogLockedError", "ScoreLogLock"]

LOCK_NAME = "writer.lock"


class ScoreLogLockedError(RuntimeError):
    """Another live run writes the score log; ``holder`` is its lock's content (pid, host, started)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (Linux: field 22 of /proc/<pid>/stat), so that a reused pid is told apart; None
    where that is not known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid``, started at ``started`` (if recorded), still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started  # another start time: the pid was reused


class ScoreLogLock:
    """The lock of the score log in ``folder`` (its ``mimic_scores/``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _start_time(os.getpid())}
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise `ScoreLogLockedError` naming the live run that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        content = json.dumps({**self.mine, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        handle, tmp = tempfile.mkstemp(prefix=".writer-lock-", dir=self.folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(content)
            for _ in range(3):  # a stale lock removed, then taken: at most a few rounds when runs race
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._clear_unless_live()
            raise RuntimeError(f"Could not take the score-log lock {self.path}: other runs keep taking it.")
        finally:
            os.unlink(tmp)

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _clear_unless_live(self) -> None:
        holder = self._holder()
        if holder is None:
            return  # released meanwhile
        pid, host = holder.get("pid"), holder.get("host")
        if pid == self.mine["pid"] and host == self.mine["host"]:
            self.path.unlink(missing_ok=True)  # this process's own lock, from a train() that raised
            return
        if isinstance(pid, int) and host == self.mine["host"] and not _alive(pid, holder.get("pid_start")):
            warnings.warn(
                f"The score log's lock {self.path} was held by pid {pid} on {host}, which no longer runs (a crashed or "
                "killed run): taking it over.",
                UserWarning,
                stacklevel=4,
            )
            self.path.unlink(missing_ok=True)
            return
        who = f"pid {pid} on host {host}" if pid is not None else "a run whose lock file cannot be read"
        raise ScoreLogLockedError(
            f"Another run ({who}, started {holder.get('started', '?')}) is writing the score log in {self.folder}: two "
            "runs in one output_dir would write their records into the same shards. Use another output_dir, or wait "
            f"for that run to end. If it is gone (e.g. it ran on another host and crashed), delete {self.path}.",
            holder,
        )

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        holder = self._holder() or {}
        if self.held and (holder.get("pid"), holder.get("host")) == (self.mine["pid"], self.mine["host"]):
            self.path.unlink(missing_ok=True)
        self.held = False
