"""What every job leaves for people to look at: who took part in which round, and one picture of the job.

:func:`participation` is the site x round table (``took part`` / ``failed`` / ``not sampled``) that goes
to result.json and, as an MLflow table, to the parent run. :func:`plot_job` draws ``summary.png`` with
matplotlib: the global loss and accuracy per round beside every site's training curves, each site's
sample count, and the participation table as a grid. Both read only the rounds' summaries the job
already holds, so they work for a job that failed or was stopped as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOOK_PART, FAILED, NOT_SAMPLED = "took part", "failed", "not sampled"
PICTURE = "summary.png"
MAX_LABELS = 50  # sites (or curves) named in the picture; beyond, they are drawn unnamed


def participation(sites: list[str], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"rounds": [1, 2, ...], "sites": {site: [status per round]}}``: a site sampled in a round either took
    part (its result was aggregated) or failed (it raised, died, timed out or was left behind)."""
    table: dict[str, list[str]] = {site: [] for site in sites}
    for r in rounds:
        for site in sites:
            status = TOOK_PART if site in r["completed"] else FAILED if site in r["sampled"] else NOT_SAMPLED
            table[site].append(status)
    return {"rounds": [r["round"] for r in rounds], "sites": table}


def participation_columns(table: dict[str, Any]) -> dict[str, list[Any]]:
    """The participation table as columns (``site``, ``round 1``, ``round 2``, ...) for an MLflow table."""
    sites = list(table["sites"])
    columns: dict[str, list[Any]] = {"site": sites}
    for i, round_ in enumerate(table["rounds"]):
        columns[f"round {round_}"] = [table["sites"][site][i] for site in sites]
    return columns


def _global_curve(rounds: list[dict[str, Any]], word: str) -> tuple[list[int], list[float]]:
    """The first global metric whose name holds ``word``, per round, as (rounds, values)."""
    xs: list[int] = []
    ys: list[float] = []
    for r in rounds:
        value = next((v for k, v in r.get("global", {}).items() if word in k and isinstance(v, (int, float))), None)
        if value is not None:
            xs.append(r["round"])
            ys.append(float(value))
    return xs, ys


def _site_curves(rounds: list[dict[str, Any]], word: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per site, each training metric whose name holds ``word``, as (rounds, values)."""
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in rounds:
        for site, result in r.get("clients", {}).items():
            for key, value in result.get("metrics", {}).items():
                if word in key and isinstance(value, (int, float)):
                    xs, ys = curves.setdefault(site, {}).setdefault(key, ([], []))
                    xs.append(r["round"])
                    ys.append(float(value))
    return curves


def load_plotting() -> None:
    """Import matplotlib for files only (the Agg back end): most of the first picture's cost."""
    import matplotlib

    matplotlib.use("Agg")  # no display is needed, or wanted, on a cluster node
    import matplotlib.pyplot  # noqa: F401


def plot_job(
    path: Path, title: str, rounds: list[dict[str, Any]], samples: dict[str, int], table: dict[str, Any]
) -> Path:
    """Draw the job's picture into ``path`` (a PNG) and return it.

    ``samples``: each site's training sample count; ``table``: :func:`participation`'s result.
    """
    load_plotting()
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    fig.suptitle(title)
    for ax, word, label in ((axes[0][0], "loss", "loss"), (axes[0][1], "acc", "accuracy")):
        xs, ys = _global_curve(rounds, word)
        for site, metrics in sorted(_site_curves(rounds, word).items()):
            for key, (sx, sy) in sorted(metrics.items()):
                ax.plot(sx, sy, marker=".", linewidth=1, alpha=0.8, label=f"{site} {key}")
        if xs:
            ax.plot(xs, ys, color="black", marker="o", linewidth=2.5, label=f"global {label}")
        ax.set(title=f"{label} per round", xlabel="round", ylabel=label)
        if rounds:
            ax.set_xticks([r["round"] for r in rounds])
        if ax.lines and len(ax.lines) <= MAX_LABELS:
            ax.legend(fontsize="small")
    ax = axes[1][0]
    names = list(samples)
    ax.bar(range(len(names)), [samples[n] for n in names], color="tab:blue")
    ax.set(title="training samples per site", ylabel="samples")
    if len(names) <= MAX_LABELS:  # thousands of virtual sites: their names would take minutes to draw, unread
        ax.set_xticks(range(len(names)), names)
        ax.tick_params(axis="x", labelrotation=45 if len(names) > 6 else 0)
    ax = axes[1][1]
    codes = {TOOK_PART: 0, FAILED: 1, NOT_SAMPLED: 2}
    sites = list(table["sites"])
    grid = [[codes[s] for s in table["sites"][site]] for site in sites]
    if grid and grid[0]:
        ax.imshow(grid, cmap=ListedColormap(["tab:green", "tab:red", "lightgrey"]), vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(table["rounds"])), [str(r) for r in table["rounds"]])
        if len(sites) <= MAX_LABELS:
            ax.set_yticks(range(len(sites)), sites)
    ax.set(title="who took part (green), failed (red), was not sampled (grey)", xlabel="round")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
