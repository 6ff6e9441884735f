"""Receivers that tests name by import path (``user_receivers:Name``), as a user's own would be."""

from __future__ import annotations

import os
import resource
import signal
import threading

from fl_ray.receivers.base import MemoryReceiver
from fl_ray.tracking.credentials import held_credentials


class CredentialProbe(MemoryReceiver):
    """Keeps events in memory and reports, at close, which credential variables its process holds."""

    def close(self, status):
        return {
            "events": len(self.events),
            "status": status,
            "credentials": held_credentials(),
        }


class FlakyReceiver(MemoryReceiver):
    """A real receiver whose back end refuses the first ``fail_times`` flushes (a back end outage)."""

    def __init__(self, fail_times: int = 2) -> None:
        super().__init__()
        self.fail_times = fail_times
        self.attempts = 0
        self._staged: list = []

    def write(self, events):
        self._staged.extend(events)

    def flush(self):
        self.attempts += 1
        staged, self._staged = self._staged, []
        if self.attempts <= self.fail_times:
            raise ConnectionError(f"back end unavailable (attempt {self.attempts})")
        self.events.extend(staged)

    def close(self, status):
        return {"events": len(self.events), "attempts": self.attempts}


class EchoReceiver(MemoryReceiver):
    """Keeps events in memory and hands all of them back, as plain tuples, in its close report."""

    def close(self, status):
        return {"status": status, "echo": [tuple(e) for e in self.events]}


class SeriesReceiver(MemoryReceiver):
    """Keeps events in memory and returns, at close, every site's metric series and params (for result.json)."""

    def close(self, status):
        metrics: dict = {}
        params: dict = {}
        for e in self.events:
            if e.kind == "metric":
                metrics.setdefault(e.site, {}).setdefault(e.key, []).append([e.step, e.value])
            elif e.kind == "param":
                params.setdefault(e.site, {})[e.key] = e.value
        return {"events": len(self.events), "status": status, "metrics": metrics, "params": params}


class DiesWhileClosing(EchoReceiver):
    """A real crash at a chosen moment: the first close() kills its own process (the receiver actor) with
    SIGKILL; Ray restarts the actor, whose close() then runs normally. A marker file in the job directory
    remembers that it died."""

    def close(self, status):
        marker = self.ctx.job_dir / "died-while-closing"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().close(status)


class FullDiskWindow(EchoReceiver):
    """A real full disk for the receiver actor: when the first records reach it (the sites are streaming), it
    caps the size of every file its process writes (RLIMIT_FSIZE) at the spool's size plus ``room`` bytes, for
    ``seconds``; appends that do not fit fail for real (EFBIG). Once per job (a marker file), so a restarted
    actor does not do it again."""

    def __init__(self, seconds: float = 4.0, room: int = 20_000) -> None:
        super().__init__()
        self.seconds, self.room = seconds, room

    def write(self, events):
        marker = self.ctx.job_dir / "full-disk-window"
        if not marker.exists():
            marker.write_text("")
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            size = (self.ctx.job_dir / "spool" / "events.jsonl").stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + self.room, hard))
            threading.Timer(self.seconds, resource.setrlimit, (resource.RLIMIT_FSIZE, (soft, hard))).start()
        super().write(events)


class RefusesKey(EchoReceiver):
    """A back end that refuses every record under ``key`` for good while the file ``backend-accepts`` is
    missing from the job directory (creating it stands for the back end being fixed)."""

    def __init__(self, key: str = "bad") -> None:
        super().__init__()
        self.key = key

    def write(self, events):
        accepts = (self.ctx.job_dir / "backend-accepts").exists()
        for e in events:
            if e.key == self.key and not accepts:
                self.set_aside(e, f"400 BAD_REQUEST: {self.key!r} is refused")
            else:
                self.events.append(e)
