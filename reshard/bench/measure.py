"""Measure how a checkpoint loads, before vs after resharding, in fresh processes.

Every trial is one child process (``python -m reshard.bench.loaders``) that loads the whole
checkpoint with one loader and touches every byte. The parent evicts the files from the
page cache before a cold trial and samples the child's anonymous memory (RssAnon) and
the kernel's RSS high-water mark (VmHWM) from ``/proc/<pid>/status`` while it runs. Sides alternate ABBA across repeats so slow drifts of the machine
hit both equally. See docs/bench.md for the method and its limits.

>>> summarize_values([3.0, 1.0, 2.0])
{'median': 2.0, 'min': 1.0, 'max': 3.0, 'n': 3}
>>> verdict("load_s", summarize_values([1.0, 1.1]), summarize_values([2.0, 2.1]))
'after is slower'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reshard.bench.loaders import LOADERS, proc_read_bytes, proc_status
from reshard.errors import BenchError, UsageError
from reshard.hub.resolve import ResolvedSource, resolve_source

log = logging.getLogger(__name__)

CACHE_MODES = ("cold", "warm")
# (key, label, unit): the figures compared in the table and the plot; lower is better.
FIGURES = (
    ("first_tensor_s", "first tensor", "s"),
    ("load_s", "load time", "s"),
    ("peak_rss", "peak RSS", "B"),
    ("peak_anon", "peak anon", "B"),
    ("read_bytes", "disk read", "B"),
)
SAMPLE_INTERVAL_S = 0.005
# A cold trial that made the block layer read less than this share of the files did not
# start cold (eviction refused, or the kernel hid the reads); it is flagged, not hidden.
COLD_READ_SHARE = 0.5
# Medians closer than this share of the larger one are called the same, whatever the spread.
SAME_SHARE = 0.01
# A plain `reshard bench`: the demo's .bin shards vs their 2GB safetensors reshard.
DEMO_MAX_SHARD = 2 * 10**9
DEMO_LOADERS = ("torch",)  # torch.load: where the .bin layout costs memory and time


@dataclass(frozen=True)
class Side:
    """One checkpoint under test.

    Attributes:
        label: ``"before"`` or ``"after"``.
        source: the resolved files.
        weight_bytes: total size of the weight files on disk.
    """

    label: str
    source: ResolvedSource
    weight_bytes: int

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file a loader may read (weights, index, config): what eviction drops."""
        extra = [self.source.index_file] if self.source.index_file else []
        return (*self.source.weight_files, *extra, *self.source.extra_files)

    @property
    def has_config(self) -> bool:
        return (self.source.root / "config.json").is_file()

    def to_json(self) -> dict:
        return {
            "spec": self.source.spec,
            "folder": str(self.source.root),
            "format": self.source.format,
            "files": [p.name for p in self.source.weight_files],
            "weight_bytes": self.weight_bytes,
        }


def make_side(label: str, spec: str | Path) -> Side:
    """Resolve ``spec`` (anything ``split`` accepts) into a ``Side``."""
    source = resolve_source(str(spec))
    return Side(label, source, sum(p.stat().st_size for p in source.weight_files))


@dataclass
class BenchResult:
    """Every trial's raw figures plus the settings they were taken with."""

    before: Side
    after: Side
    settings: dict
    trials: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per loader, cache mode and figure: before/after stats, ratio, verdict."""
        return summary_rows(self.trials, self.settings["loaders"], self.settings["caches"])

    def to_json(self) -> dict:
        return {
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "settings": self.settings,
            "trials": self.trials,
            "summary": self.rows(),
            "skipped": self.skipped,
            "notes": self.notes,
        }


def summary_rows(trials: list[dict], loaders: list[str], caches: list[str]) -> list[dict]:
    """The table's rows from raw trials (also re-summarizes a saved ``--json`` output).

    >>> t = {"side": "before", "loader": "torch", "cache": "warm", "load_s": 2.0}
    >>> [r["ratio"] for r in summary_rows([t, {**t, "side": "after", "load_s": 1.0}],
    ...                                    ["torch"], ["warm"])]
    [0.5]
    """

    def values(side: str, loader: str, cache: str, key: str) -> list[float]:
        return [
            t[key]
            for t in trials
            if t["side"] == side and t["loader"] == loader and t["cache"] == cache and t.get(key) is not None
        ]

    rows = []
    for loader in loaders:
        for cache in caches:
            for key, label, unit in FIGURES:
                stats = {
                    side: summarize_values(values(side, loader, cache, key)) for side in ("before", "after")
                }
                if stats["before"] is None and stats["after"] is None:
                    continue
                rows.append(
                    {
                        "loader": loader,
                        "cache": cache,
                        "figure": key,
                        "label": label,
                        "unit": unit,
                        **stats,
                        "ratio": ratio(stats["before"], stats["after"]),
                        "verdict": verdict(key, stats["before"], stats["after"]),
                    }
                )
    return rows


def summarize_values(values: list[float]) -> dict | None:
    """Median, min, max and count, or None for no values."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(before: dict | None, after: dict | None) -> float | None:
    """after / before of the medians (below 1: after is lower)."""
    if not before or not after or not before["median"]:
        return None
    return after["median"] / before["median"]


def verdict(key: str, before: dict | None, after: dict | None) -> str:
    """A few words on the difference, refusing to call it when the spread is larger."""
    if not before or not after:
        return "n/a"
    diff = after["median"] - before["median"]
    if abs(diff) <= SAME_SHARE * max(abs(before["median"]), abs(after["median"])):
        return "about the same"
    if min(before["n"], after["n"]) < 2:
        return "one trial: spread unknown"
    spread = max(before["max"] - before["min"], after["max"] - after["min"])
    overlap = before["min"] <= after["max"] and after["min"] <= before["max"]
    # Ranges that do not overlap at all separate the sides, whatever their width.
    if spread > abs(diff) and overlap:
        return "too noisy to tell"
    if key.endswith("_s"):
        return "after is faster" if diff < 0 else "after is slower"
    if key == "read_bytes":
        return "after reads less" if diff < 0 else "after reads more"
    return "after uses less" if diff < 0 else "after uses more"


def evict(paths) -> None:
    """Drop ``paths`` from the page cache so the next read comes from disk.

    ``fsync`` first: dirty pages are not dropped. Pages another process has mapped, or
    that are locked, stay; the cold trial's ``read_bytes`` shows whether eviction took.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)
            except OSError:  # read-only filesystems may refuse; they hold no dirty pages
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(paths) -> None:
    """Read ``paths`` once so a warm trial finds them in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(_BUFFER):
                pass


_BUFFER = bytearray(8 << 20)


def plan_trials(
    before: Side, after: Side, loaders: list[str], caches: list[str], repeats: int
) -> tuple[list[tuple[Side, str, str, int]], dict[str, str]]:
    """The trials to run, in order, and the loader/side pairs skipped with why.

    Sides alternate before/after, after/before from one repeat to the next (ABBA).
    """
    skipped: dict[str, str] = {}
    runnable = {}
    for side in (before, after):
        for loader in loaders:
            spec = LOADERS[loader]
            why = None
            if not spec.reads(side.source.format):
                why = f"{loader} cannot read .{side.source.format} files"
            elif spec.needs_config and not side.has_config:
                why = f"{side.source.root} has no config.json"
            if why:
                skipped[f"{side.label}/{loader}"] = why
            runnable[side.label, loader] = why is None
    trials = []
    for repeat in range(repeats):
        for loader in loaders:
            for cache in caches:
                order = (before, after) if repeat % 2 == 0 else (after, before)
                trials += [(s, loader, cache, repeat) for s in order if runnable[s.label, loader]]
    return trials, skipped


def run_trial(side: Side, loader: str, cache: str, device: str = "cpu", python: str = sys.executable) -> dict:
    """One fresh child process loading ``side`` with ``loader``; returns its figures.

    Raises:
        BenchError: the child failed or was killed (its last stderr line is in the message).
    """
    if cache == "cold":
        evict(side.files)
    else:
        warm_up(side.files)
    with tempfile.TemporaryDirectory(prefix="reshard-trial-") as tmp:
        request, result, errors = Path(tmp, "request.json"), Path(tmp, "result.json"), Path(tmp, "err")
        request.write_text(
            json.dumps(
                {
                    "loader": loader,
                    "device": device,
                    "folder": str(side.source.root),
                    "files": [str(p) for p in side.source.weight_files],
                }
            )
        )
        started = time.perf_counter()
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [python, "-m", "reshard.bench.loaders", str(request), str(result)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
            peak_anon, peak_hwm = _wait_sampling(proc)
        wall = time.perf_counter() - started
        code = proc.returncode
        if code != 0 or not result.exists():
            raise BenchError(_child_failure(side, loader, code, errors.read_text(errors="replace")))
        figures = json.loads(result.read_text())
    figures["peak_anon"] = max(peak_anon, figures["end_anon"] or 0)
    # VmHWM: the kernel's RSS high-water mark of the loader's own (post-exec) image.
    figures["peak_rss"] = max(peak_hwm, figures["vm_hwm"] or 0)
    figures["process_s"] = wall
    return {"side": side.label, "loader": loader, "cache": cache, "device": device, **figures}


def _wait_sampling(proc: subprocess.Popen) -> tuple[int, int]:
    """Wait for ``proc``, sampling its RssAnon and VmHWM; returns the peaks seen.

    Sampling from here rather than a thread in the child: a loader holding the GIL in
    C code cannot stall the sampler. (``wait4``'s ru_maxrss is no use: it keeps the
    parent's RSS from before the child's exec, so a large parent inflates it.)
    """
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        try:
            status = proc_status(proc.pid)
        except (OSError, ValueError):
            status = {}  # exiting between poll and the read
        peak_anon = max(peak_anon, status.get("RssAnon", 0))
        peak_hwm = max(peak_hwm, status.get("VmHWM", 0))
        time.sleep(SAMPLE_INTERVAL_S)
    return peak_anon, peak_hwm


def _child_failure(side: Side, loader: str, code: int, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if code < 0:
        why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    else:
        why = f"exited with {code}"
    return (
        f"{side.source.spec}: the {loader} loader {why}: {last}; rerun with RESHARD_DEBUG=1 "
        "or load it by hand to see the full error"
    )


def check_device(device: str) -> None:
    """Refuse ``--device`` values this machine cannot run."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise UsageError(f"--device {device}: use cpu or cuda (cuda:N for a given GPU)")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )


def check_loaders(loaders: list[str]) -> list[str]:
    """Validate ``--loader`` values; the default is every loader whose library is installed."""
    import importlib.util

    for name in loaders:
        if name not in LOADERS:
            raise UsageError(f"--loader {name}: unknown loader; use {', '.join(LOADERS)}")
        if importlib.util.find_spec(LOADERS[name].module) is None:
            raise UsageError(
                f"--loader {name}: {LOADERS[name].module} is not installed; "
                f"pip install {LOADERS[name].module}"
            )
    if loaders:
        return list(dict.fromkeys(loaders))
    return [n for n, s in LOADERS.items() if importlib.util.find_spec(s.module) is not None]


def run_bench(
    before: Side,
    after: Side,
    *,
    loaders: list[str],
    caches: list[str],
    repeats: int = 3,
    device: str = "cpu",
    on_trial: Callable[[int, int, dict], None] | None = None,
) -> BenchResult:
    """Run every trial and collect the figures.

    Args:
        before, after: the two checkpoints.
        loaders: names from ``LOADERS``; caches: ``"cold"`` and/or ``"warm"``.
        repeats: trials per side, loader and cache mode.
        on_trial: called with (done, total, trial) after each trial (progress).

    Raises:
        BenchError: a trial failed; UsageError: nothing to run.

    Example (needs a model on disk, so it is not run as a doctest)::

        run_bench(side, side, loaders=["torch"], caches=["warm"], repeats=1)
    """
    if repeats < 1:
        raise UsageError("--repeats must be at least 1")
    trials, skipped = plan_trials(before, after, loaders, caches, repeats)
    if not trials:
        raise UsageError("no loader can read these checkpoints: " + "; ".join(skipped.values()))
    settings = {
        "loaders": loaders,
        "caches": caches,
        "repeats": repeats,
        "device": device,
        "python": sys.executable,
        "sample_interval_s": SAMPLE_INTERVAL_S,
    }
    result = BenchResult(before, after, settings, skipped=skipped)
    for done, (side, loader, cache, repeat) in enumerate(trials, start=1):
        trial = {"repeat": repeat, **run_trial(side, loader, cache, device)}
        result.trials.append(trial)
        _check_cold(result, side, trial)
        if on_trial:
            on_trial(done, len(trials), trial)
    if proc_read_bytes() is None:
        result.notes.append(
            "this kernel does not report read_bytes in /proc/<pid>/io: "
            "whether cold trials read from disk cannot be checked"
        )
    return result


def _check_cold(result: BenchResult, side: Side, trial: dict) -> None:
    read = trial.get("read_bytes")
    if trial["cache"] != "cold" or read is None or read >= COLD_READ_SHARE * side.weight_bytes:
        return
    note = (
        f"{side.label}: a cold {trial['loader']} trial read only {read:,} of "
        f"{side.weight_bytes:,} bytes from disk: eviction did not fully take "
        "(files mapped by another process, or a filesystem that ignores fadvise)"
    )
    if note not in result.notes:
        result.notes.append(note)


@dataclass
class Prepared:
    """The two sides of a bench, and what to delete afterwards."""

    before: Side
    after: Side
    cleanup: list[Path] = field(default_factory=list)


def prepare_sides(
    specs: list[str], max_shard_size: int | None, workdir: Path | None = None, progress=None
) -> Prepared:
    """Turn the CLI's 0, 1 or 2 sources into two sides.

    Two specs are compared as given; one is resharded into a temporary folder at
    ``max_shard_size`` (split's default when None); none compares the demo checkpoint as
    its original repo ships it (large ``.bin`` shards, ``reshard.bench.data``) with its
    ``DEMO_MAX_SHARD`` (2GB) safetensors reshard: the case resharding exists for.

    Raises:
        UsageError: more than two sources, or ``max_shard_size`` with two.
    """
    from reshard.split import DEFAULT_MAX_SHARD_SIZE, split_checkpoint

    if len(specs) > 2:
        raise UsageError("reshard bench takes at most two checkpoints: BEFORE AFTER")
    if len(specs) == 2:
        if max_shard_size is not None:
            raise UsageError("--max-shard reshards one SOURCE; with BEFORE AFTER it has no use")
        return Prepared(make_side("before", specs[0]), make_side("after", specs[1]))
    default = DEFAULT_MAX_SHARD_SIZE
    if not specs:
        from reshard.bench.data import demo_bin_source

        specs = [str(demo_bin_source(Path(os.environ.get("RESHARD_DEMO_DIR", "demo-out"))))]
        default = DEMO_MAX_SHARD
    before = make_side("before", specs[0])
    tmp = Path(tempfile.mkdtemp(prefix="reshard-bench-", dir=workdir))
    try:
        limit = max_shard_size or default
        out = tmp / f"{before.source.name}-resharded"
        split_checkpoint(specs[0], out, limit, progress=progress)
        return Prepared(before, make_side("after", out), [tmp])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cleanup(prepared: Prepared) -> None:
    """Delete the temporary reshard, if one was made."""
    for path in prepared.cleanup:
        shutil.rmtree(path, ignore_errors=True)


def bench_checkpoints(
    specs: list[str],
    *,
    max_shard_size: int | None = None,
    loaders: list[str] | None = None,
    cache: str = "both",
    repeats: int = 3,
    device: str = "cpu",
    workdir: Path | None = None,
    split_progress=None,
    on_trial=None,
) -> BenchResult:
    """The ``reshard bench`` job: prepare the sides, run every trial, clean up.

    Example (needs a model on disk, so it is not run as a doctest)::

        bench_checkpoints(["./before", "./after"], loaders=["torch"], repeats=1)
    """
    if cache not in ("cold", "warm", "both"):
        raise UsageError(f"--cache {cache}: use cold, warm or both")
    caches = list(CACHE_MODES) if cache == "both" else [cache]
    chosen = check_loaders(loaders or [])
    check_device(device)
    prepared = prepare_sides(specs, max_shard_size, workdir, split_progress)
    try:
        result = run_bench(
            prepared.before,
            prepared.after,
            loaders=chosen,
            caches=caches,
            repeats=repeats,
            device=device,
            on_trial=on_trial,
        )
    finally:
        cleanup(prepared)
    if len(specs) < 2:
        from reshard.split import DEFAULT_MAX_SHARD_SIZE

        result.settings["max_shard_size"] = max_shard_size or (
            DEFAULT_MAX_SHARD_SIZE if specs else DEMO_MAX_SHARD
        )
    return result


def default_settings(specs: list[str], loaders, cache, repeats) -> tuple[list[str] | None, str, int]:
    """``--loader``, ``--cache`` and ``--repeats`` where not given. A plain ``reshard bench``
    (no sources) runs the demo in about two minutes: plain ``torch.load`` (what a PyTorch
    script does, and where a .bin layout costs memory), warm cache, three trials per side;
    with sources, every installed loader, cold and warm, three trials.

    >>> default_settings([], None, None, None)
    (['torch'], 'warm', 3)
    >>> default_settings(["./m"], None, None, None)
    (None, 'both', 3)
    """
    if specs:
        return loaders, cache or "both", repeats or 3
    return loaders or list(DEMO_LOADERS), cache or "warm", repeats or 3
