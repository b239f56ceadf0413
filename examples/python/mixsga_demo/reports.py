"""What the demo and the study share in their outputs: the perplexity-vs-KV-budget plot's frame and the
checks that every output exists and every figure in it is finite (what CI runs after --quick)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from pathlib import Path


def settings_key(settings: dict) -> str:
    """A short hash of the settings a run's numbers depend on: rows of a runs file carry it as
    ``config_key``, so rows of other settings are never mixed in."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_rows(path: Path, key: str | None = None) -> list[dict]:
    """The rows (one JSON object a line) of the runs file ``path`` whose ``config_key`` is ``key`` (all rows
    when ``key`` is None)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if key is None else [r for r in rows if r.get("config_key") == key]


def append_row(path: Path, row: dict) -> None:
    """Appends one JSON line and syncs it to disk: a resumed run trusts every line it finds. One short
    write per line, so lines of several worker processes do not interleave."""
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def budget_axes(figsize: tuple[float, float]):
    """(pyplot, figure, axes) of a headless matplotlib figure for perplexity against KV budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    return plt, fig, ax


def save_budget_plot(plt, fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("KV cache budget (% of the base model)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_checked_report(out_dir: Path, names: tuple[str, ...]) -> dict:
    """report.json of ``out_dir`` after checking that every file of ``names`` exists and is not empty."""
    for name in names:
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0:
            raise RuntimeError(f"out: {out_dir / name} is missing or empty")
    return json.loads((out_dir / "report.json").read_text())


def check_positive_finite(rows: list[dict], keys: tuple[str, ...]) -> None:
    """Every row's ``keys`` are finite numbers > 0; the error names the arm, the key and the value."""
    for r in rows:
        for key in keys:
            value = r.get(key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise RuntimeError(f"report.json: arm {r['arm']!r} has {key} = {value!r}")
