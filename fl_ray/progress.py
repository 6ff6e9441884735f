"""What the driver shows while a job runs: a progress bar per round, then a summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RoundProgress:
    """A live progress bar whose line shows the last round's sites, global loss and accuracy."""

    def __init__(self, job_id: str, num_rounds: int, done: int = 0, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[last]}"),
            console=self.console, disable=not enabled, transient=False,
        )
        if enabled:
            resumed = f", resuming after round {done}" if done else ""
            self.console.print(f"[bold]{job_id}[/]: {num_rounds} round(s){resumed}", highlight=False)
        self._task = self._progress.add_task("", total=num_rounds, completed=done, last="starting sites…")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def round_done(self, summary: dict[str, Any]) -> None:
        """Advance by one round and show its figures."""
        g = summary["global"]
        failed = f" [red]{len(summary['failures'])} failed[/]" if summary["failures"] else ""
        text = (f"round {summary['round']}: sites {len(summary['completed'])}/{len(summary['sampled'])}{failed}  "
                f"loss {g.get('loss', float('nan')):.4f}  acc {g.get('accuracy', float('nan')):.4f}")
        self._progress.update(self._task, advance=1, last=text)


def summary_table(result: dict[str, Any], max_rows: int = 12) -> Table:
    """The per-round global metrics (first and last rounds when there are many)."""
    table = Table(title=f"{result['job_id']} — {result['status']}", title_justify="left")
    for col in ("round", "sites", "global loss", "global accuracy", "seconds"):
        table.add_column(col, justify="right")
    rounds = result["rounds"]
    shown = rounds if len(rounds) <= max_rows else rounds[: max_rows // 2] + [None] + rounds[-max_rows // 2:]
    for r in shown:
        if r is None:
            table.add_row("…", "", "", "", "")
            continue
        g = r["global"]
        table.add_row(str(r["round"]), f"{len(r['completed'])}/{len(r['sampled'])}",
                      f"{g.get('loss', float('nan')):.4f}", f"{g.get('accuracy', float('nan')):.4f}",
                      f"{r['seconds']:.2f}")
    return table
