"""What the driver shows while a job runs: a line as each phase starts, a progress bar per round, a bar
of tracking records left per receiver at the end, then a summary table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class JobPhases:
    """The phases of a job as they start: a line each on ``console`` (when ``enabled``), prefixed with the
    seconds since the job began, and ``timings`` (phase -> those seconds) for result.json.

    ``started_at`` is the job's start on the wall clock (seconds since the epoch), so that a time an actor
    reports from its own clock on the same node can be placed too (``mark(..., at=...)``).
    """

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.started_at = time.time()
        self._start = time.monotonic()
        self.timings: dict[str, float] = {}

    def seconds(self) -> float:
        """Seconds since the job began."""
        return time.monotonic() - self._start

    def mark(self, phase: str, line: str | None = None, at: float | None = None) -> float:
        """Record that ``phase`` starts now (or started at the wall-clock time ``at``) and show ``line``;
        returns its seconds since the job began. A phase keeps its first time."""
        seconds = self.seconds() if at is None else max(0.0, at - self.started_at)
        self.timings.setdefault(phase, round(seconds, 3))
        if line is not None and self.enabled:
            self.console.print(f"[dim]{seconds:6.1f}s[/] {line}", highlight=False)
        return seconds


class DeliveryProgress:
    """A bar per tracking receiver: the records it has been sent of those it has to get, while the
    receiver actor delivers what is left at the end of a job."""

    def __init__(self, pending: dict[str, int], console: Console, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[left]:,} left"),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._tasks = {
            name: self._progress.add_task(f"  {name}", total=max(left, 1), completed=0, left=left)
            for name, left in pending.items()
        }
        self._total = dict(pending)

    def __enter__(self) -> DeliveryProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def update(self, pending: dict[str, int]) -> None:
        """Show what each receiver still has to get (records accepted after the start count too)."""
        for name, left in pending.items():
            if name not in self._tasks:
                continue
            total = self._total[name] = max(self._total[name], left)
            self._progress.update(self._tasks[name], total=max(total, 1), completed=total - left, left=left)


class RoundProgress:
    """A live progress bar whose line shows the last round's sites, global loss and accuracy."""

    def __init__(
        self, job_id: str, num_rounds: int, done: int = 0, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        if enabled:
            resumed = f", resuming after round {done}" if done else ""
            self.console.print(f"[bold]{job_id}[/]: {num_rounds} round(s){resumed}", highlight=False)
        self._task = self._progress.add_task("", total=num_rounds, completed=done, last=f"round {done + 1} running…")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def round_done(self, summary: dict[str, Any]) -> None:
        """Advance by one round and show its figures."""
        g = summary["global"]
        failed = f" [red]{len(summary['failures'])} failed[/]" if summary["failures"] else ""
        text = (
            f"round {summary['round']}: sites {len(summary['completed'])}/{len(summary['sampled'])}{failed}  "
            f"loss {g.get('loss', float('nan')):.4f}  acc {g.get('accuracy', float('nan')):.4f}"
        )
        self._progress.update(self._task, advance=1, last=text)


def summary_table(result: dict[str, Any], max_rows: int = 12) -> Table:
    """The per-round global metrics (first and last rounds when there are many)."""
    table = Table(title=f"{result['job_id']} — {result['status']}", title_justify="left")
    for col in ("round", "sites", "global loss", "global accuracy", "seconds"):
        table.add_column(col, justify="right")
    rounds = result["rounds"]
    shown = rounds if len(rounds) <= max_rows else rounds[: max_rows // 2] + [None] + rounds[-max_rows // 2 :]
    for r in shown:
        if r is None:
            table.add_row("…", "", "", "", "")
            continue
        g = r["global"]
        table.add_row(
            str(r["round"]),
            f"{len(r['completed'])}/{len(r['sampled'])}",
            f"{g.get('loss', float('nan')):.4f}",
            f"{g.get('accuracy', float('nan')):.4f}",
            f"{r['seconds']:.2f}",
        )
    return table
