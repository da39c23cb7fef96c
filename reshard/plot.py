"""Draw a ``reshard bench`` result: load time and peak memory, before vs after, per loader.

matplotlib is the optional ``plot`` extra; it is imported here only.

>>> plot_bench(result.to_json(), Path("bench.png"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from reshard.errors import UsageError

# (figure key, panel title, scale, unit): what the three panels show.
PANELS = (
    ("load_s", "load time", 1.0, "s"),
    ("peak_rss", "peak RSS (VmHWM)", 1e9, "GB"),
    ("peak_anon", "peak anonymous memory (RssAnon)", 1e9, "GB"),
)
COLORS = {"before": "#9e9e9e", "after": "#1f77b4"}


def plot_bench(data: dict, path: Path) -> Path:
    """Write a PNG with one panel per figure; bars are medians, whiskers min..max.

    Args:
        data: ``BenchResult.to_json()``.
        path: where to write the PNG.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'reshard[plot]'") from e
    matplotlib.use("Agg")  # no display needed, and no GUI backend import cost
    import matplotlib.pyplot as plt

    rows = {(r["loader"], r["cache"], r["figure"]): r for r in data["summary"]}
    groups = [(l, c) for l in data["settings"]["loaders"] for c in data["settings"]["caches"]
              if any((l, c, key) in rows for key, *_ in PANELS)]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title, scale, unit) in zip(axes, PANELS):
        for offset, side in ((-0.2, "before"), (0.2, "after")):
            stats = [rows.get((l, c, key), {}).get(side) for l, c in groups]
            xs = [i + offset for i in range(len(groups))]
            med = [s["median"] / scale if s else 0 for s in stats]
            err = [[(s["median"] - s["min"]) / scale if s else 0 for s in stats],
                   [(s["max"] - s["median"]) / scale if s else 0 for s in stats]]
            ax.bar(xs, med, width=0.4, color=COLORS[side], label=side, yerr=err, capsize=3)
        ax.set_xticks(range(len(groups)), [f"{l}\n{c}" for l, c in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
    axes[0].legend(fontsize=8)
    before, after = data["before"], data["after"]
    fig.suptitle(f"before: {before['format']}, {len(before['files'])} file(s)   "
                 f"after: {after['format']}, {len(after['files'])} file(s)   "
                 f"(median of {data['settings']['repeats']}, whiskers min-max)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
