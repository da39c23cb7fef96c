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
    groups = [
        (ld, c)
        for ld in data["settings"]["loaders"]
        for c in data["settings"]["caches"]
        if any((ld, c, key) in rows for key, *_ in PANELS)
    ]
    height = max(3.0, 0.55 * len(groups) + 1.4)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), height), sharey=True)
    for ax, (key, title, scale, unit) in zip(axes, PANELS):
        # Horizontal bars: the loader/cache labels stay readable however many there are.
        for offset, side in ((-0.2, "before"), (0.2, "after")):
            stats = [rows.get((ld, c, key), {}).get(side) for ld, c in groups]
            ys = [i + offset for i in range(len(groups))]
            med = [s["median"] / scale if s else 0 for s in stats]
            err = [
                [(s["median"] - s["min"]) / scale if s else 0 for s in stats],
                [(s["max"] - s["median"]) / scale if s else 0 for s in stats],
            ]
            ax.barh(
                ys,
                med,
                height=0.4,
                color=COLORS[side],
                label=side,
                xerr=err,
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
            for y, s in zip(ys, stats):
                if s is None:
                    ax.text(0, y, " n/a", va="center", fontsize=7, color="#555555")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(groups)), [f"{ld} ({c})" for ld, c in groups], fontsize=8)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8, loc="lower right")
    before, after = data["before"], data["after"]
    fig.suptitle(
        f"before: {before['format']}, {len(before['files'])} file(s)   "
        f"after: {after['format']}, {len(after['files'])} file(s)   "
        f"(median of {data['settings']['repeats']}, whiskers min-max)",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
