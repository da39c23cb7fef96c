"""The ``reshard`` command line: parse options, call the library, render with rich.

Every ``ReshardError`` becomes one line on stderr and a non-zero exit; set
``RESHARD_DEBUG=1`` for the traceback. Heavy imports happen inside the commands so
``reshard --help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from reshard.errors import ReshardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stream large checkpoints into size-bounded safetensors shards, flat in memory.")

SOURCE_HELP = "Local folder, file (.safetensors/.bin/index.json) or Hub repo id (org/name)."


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def configure_logging(debug: bool) -> None:
    """Send log records to stderr. Normally only the ``reshard`` logger gets a handler, at
    WARNING: huggingface_hub has its own, and a root handler would print its warnings
    twice. ``RESHARD_DEBUG=1`` logs everything (httpx, huggingface_hub too) at DEBUG."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if debug:
        logging.basicConfig(level=logging.DEBUG, format=fmt, stream=sys.stderr)
        return
    logger = logging.getLogger("reshard")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def handle_errors(func):
    """Map reshard's errors (and Ctrl-C) to one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("RESHARD_DEBUG") == "1"
        configure_logging(debug)
        try:
            return func(*args, **kwargs)
        except ReshardError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted; nothing was left behind", 130)

    return wrapper


def print_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
@handle_errors
def split(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (default ./<name>-resharded)."),
    max_shard: str = typer.Option("5GB", "--max-shard", help="Tensor bytes per shard: 2GB (10^9), 2GiB (2^30) or a byte count."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: stored login / HF_TOKEN).", show_default=False),
    dtype: Optional[str] = typer.Option(None, help="Convert floating-point tensors: bf16, fp16 or fp32."),
    key: Optional[str] = typer.Option(None, help="Entry holding the weights in a nested .bin training checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing (repo ids: headers only)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    resume: bool = typer.Option(False, "--resume", help="Keep the verified shards of an interrupted run instead of starting over."),
    checksum: bool = typer.Option(False, "--checksum", help="Report each output file's sha256 (in --json, or as sha256sum lines)."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor parallel over N GPUs: rank-0/ ... rank-(N-1)/ with each rank's slices, plus tp_plan.json."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline parallel over N GPUs: stage-0/ ... with each stage's layers, plus pp_plan.json."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help="With --tp N on a mixture of experts: place whole experts (rank r gets experts [r*E/N, (r+1)*E/N)) instead of splitting each one."),
    push_to: Optional[str] = typer.Option(None, "--push-to", help="After the split, publish the output to this Hub repo (see `reshard push`)."),
    private: bool = typer.Option(False, "--private", help="With --push-to: create the repo private."),
    push_revision: Optional[str] = typer.Option(None, "--push-revision", help="With --push-to: branch to commit to."),
    create_pr: bool = typer.Option(False, "--create-pr", help="With --push-to: open a pull request instead."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="With --push-to: commit message."),
) -> None:
    """Reshard SOURCE into size-bounded safetensors shards plus the index transformers reads."""
    from reshard.units import parse_dtype
    from reshard.cli.progress import make_progress
    from reshard.cli.render import render_split
    from reshard.split import split_checkpoint
    from reshard.units import parse_size

    limit = parse_size(max_shard)
    if expert_parallel and tp is None:
        from reshard.errors import UsageError

        raise UsageError("--expert-parallel needs --tp N (experts are placed across the "
                         "tensor-parallel ranks)")
    if tp is not None or pp is not None:  # per-GPU checkpoints: reshard/parallel
        return _split_parallel(source, output, limit, tp, pp, revision, token, dtype, key,
                               overwrite, as_json, quiet, resume, expert_parallel,
                               unsupported=[name for name, on in (("--dry-run", dry_run),
                                            ("--checksum", checksum),
                                            ("--push-to", push_to)) if on])
    progress = make_progress(quiet or as_json)
    try:
        result = split_checkpoint(source, output, limit, revision=revision, token=token,
                                  dtype=parse_dtype(dtype) if dtype else None, key=key,
                                  overwrite=overwrite, dry_run=dry_run, progress=progress,
                                  resume=resume, checksum=checksum)
    finally:
        getattr(progress, "close", lambda: None)()
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    pushed = _push_split(result, push_to, token=token, private=private, revision=push_revision,
                         create_pr=create_pr, commit_message=commit_message,
                         quiet=quiet or as_json) if push_to else None
    if as_json:
        print_json({**result.to_json(), **({"push": pushed.to_json()} if pushed else {})})
    elif not quiet:
        render_split(result)
    if result.checksums is not None and not as_json:
        for name, digest in result.checksums.items():
            typer.echo(f"{digest}  {name}")  # sha256sum's format: `sha256sum -c` reads it
    if pushed and not as_json:
        from reshard.hub.push import describe

        typer.echo(describe(pushed))


def _push_split(result, repo_id: str, quiet: bool, **options):
    """``split --push-to``: push the verified output (never a dry run)."""
    from reshard.errors import UsageError
    from reshard.hub.push import push_after_split, quiet_hub_progress

    if result.dry_run:
        raise UsageError("--push-to needs a written folder; drop --dry-run")
    if quiet:
        quiet_hub_progress()
    return push_after_split(result.output, repo_id, **options)


@app.command()
@handle_errors
def inspect(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(None, help="Hub token.", show_default=False),
    key: Optional[str] = typer.Option(None, help="Entry holding the weights in a nested .bin checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Tensor count, parameters by dtype, total bytes, largest tensor and current shards."""
    from reshard.formats.registry import load_checkpoint
    from reshard.summary import summarize
    from reshard.cli.render import render_inspect
    from reshard.hub.resolve import resolve_source

    summary = summarize(load_checkpoint(resolve_source(source, revision, token), key=key))
    summary["source"] = source
    print_json(summary) if as_json else render_inspect(summary)


@app.command()
@handle_errors
def verify(
    folder: Path = typer.Argument(..., help="A folder written by reshard split."),
    against: Optional[str] = typer.Option(None, help="Also compare every tensor's bytes to this source."),
    key: Optional[str] = typer.Option(None, help="Entry holding the weights in a nested .bin source."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Check that index and files agree, headers are valid and (with --against) bytes match."""
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import resolve_source
    from reshard.units import format_size
    from reshard.run.verify import verify_folder

    source = load_checkpoint(resolve_source(against), key=key) if against else None
    report = verify_folder(folder, source)
    if as_json:
        print_json(report.to_json())
        return
    compared = f", {format_size(report.compared_bytes)} compared with {against}" if against else ""
    typer.echo(f"ok: {report.tensors} tensors in {len(report.files)} files, "
               f"{format_size(report.total_size)}{compared}")


@app.command()
@handle_errors
def bench(
    sources: Optional[list[str]] = typer.Argument(None, help="BEFORE AFTER, or one SOURCE to reshard with --max-shard, or none for the demo checkpoint."),
    max_shard: Optional[str] = typer.Option(None, "--max-shard", help="Reshard a single SOURCE at this size (default 5GB) and compare."),
    loader: Optional[list[str]] = typer.Option(None, "--loader", help="safetensors, torch, torch-mmap, transformers (repeatable; default: all installed)."),
    cache: str = typer.Option("both", help="Page cache before each trial: cold, warm or both."),
    repeats: int = typer.Option(3, help="Trials per side, loader and cache mode."),
    device: str = typer.Option("cpu", help="cpu, or cuda to move the weights to the GPU."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of load time and peak memory (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print every trial's raw figures as JSON."),
) -> None:
    """Load time and peak RAM of a checkpoint before vs after resharding, in fresh processes."""
    from reshard.bench.measure import bench_checkpoints
    from reshard.bench.render import render_bench
    from reshard.units import parse_size

    def on_trial(done: int, total: int, trial: dict) -> None:
        typer.echo(f"trial {done}/{total}: {trial['side']} {trial['loader']} {trial['cache']} "
                   f"{trial['load_s']:.2f}s", err=True)

    result = bench_checkpoints(sources or [], max_shard_size=parse_size(max_shard) if max_shard else None,
                               loaders=loader, cache=cache, repeats=repeats, device=device,
                               on_trial=on_trial)
    data = result.to_json()
    if plot:
        from reshard.bench.plot import plot_bench

        plot_bench(data, plot)
    print_json(data) if as_json else render_bench(data)


def _split_parallel(source, output, limit, tp, pp, revision, token, dtype, key, overwrite,
                    as_json, quiet, resume: bool, expert_parallel: bool,
                    unsupported: list[str]) -> None:
    from reshard.units import parse_dtype
    from reshard.errors import UsageError
    from reshard.parallel.render import render_parallel_split
    from reshard.parallel.split_parallel import split_parallel
    from reshard.cli.progress import make_progress
    import inspect

    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} does not apply with --tp/--pp yet; "
                         "`reshard plan` previews the split")
    if expert_parallel and "expert_parallel" not in inspect.signature(split_parallel).parameters:
        # TODO(lead): remove once split_parallel takes expert_parallel (issue 11).
        raise UsageError("split --expert-parallel is not wired into the writer yet; "
                         "`reshard plan --strategy tensor --expert-parallel` previews it")
    progress = make_progress(quiet or as_json)
    try:
        result = split_parallel(source, output, tp=tp, pp=pp, max_shard_size=limit,
                                revision=revision, token=token,
                                dtype=parse_dtype(dtype) if dtype else None, key=key,
                                overwrite=overwrite, progress=progress, resume=resume,
                                **({"expert_parallel": True} if expert_parallel else {}))
    finally:
        getattr(progress, "close", lambda: None)()
    _report(result, as_json, quiet, render_parallel_split)


def _report(result, as_json: bool, quiet: bool, render) -> None:
    """Warnings on stderr, then the result: JSON, or the rendered summary unless quiet."""
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(result.to_json())
    elif not quiet:
        render(result)


@app.command()
@handle_errors
def plan(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    gpus: int = typer.Option(1, "--gpus", help="Number of GPUs to spread the model over."),
    strategy: str = typer.Option("pipeline", "--strategy", help="pipeline (whole layers per GPU) or tensor (every layer split)."),
    context: int = typer.Option(4096, "--context", help="Tokens of context per sequence (sizes the KV cache)."),
    batch: int = typer.Option(1, "--batch", help="Sequences at once."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU (80GB, 24GiB): say whether it fits and the fewest GPUs that would."),
    dtype: Optional[str] = typer.Option(None, help="Run the weights in bf16, fp16 or fp32 (default: as stored)."),
    device_map: Optional[Path] = typer.Option(None, "--device-map", help="Write the pipeline plan as a transformers/accelerate device_map JSON file."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help="With --strategy tensor on a mixture of experts: whole experts per GPU instead of a slice of each."),
    headroom: str = typer.Option("1GB", "--headroom", help="Memory per GPU kept free for the CUDA context and allocator (0 for none); counted in the fit verdict."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(None, help="Hub token.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Per-GPU weights, KV cache and activations for SOURCE over N GPUs (headers and config.json only)."""
    from reshard.units import parse_dtype
    from reshard.parallel.planner import plan_parallel, write_plan_device_map
    from reshard.parallel.render import render_plan
    from reshard.units import parse_size

    result = plan_parallel(source, gpus, strategy, context, batch,
                           parse_size(gpu_memory) if gpu_memory else None,
                           parse_dtype(dtype) if dtype else None, revision, token,
                           expert_parallel=expert_parallel,
                           headroom=0 if headroom.strip() == "0" else parse_size(headroom))
    if device_map is not None:
        write_plan_device_map(result, device_map)
    if as_json:
        print_json({**result.to_json(), "device_map": str(device_map) if device_map else None})
    else:
        render_plan(result, device_map)


@app.command()
@handle_errors
def merge(
    folder: Path = typer.Argument(..., help="A folder written by reshard split --tp N or --pp N."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the merged checkpoint."),
    max_shard: str = typer.Option("5GB", "--max-shard", help="Tensor bytes per shard: 2GB (10^9), 2GiB (2^30) or a byte count."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    resume: bool = typer.Option(False, help="Keep the verified shards of an interrupted merge into the same -o."),
) -> None:
    """Reassemble tensor- or pipeline-parallel outputs into one ordinary checkpoint."""
    from reshard.parallel.merge import merge_parallel
    from reshard.parallel.render import render_merge
    from reshard.cli.progress import make_progress
    from reshard.units import parse_size

    progress = make_progress(quiet or as_json)
    try:
        result = merge_parallel(folder, output, parse_size(max_shard), overwrite, progress,
                                resume=resume)
    finally:
        getattr(progress, "close", lambda: None)()
    _report(result, as_json, quiet, render_merge)


@app.command()
@handle_errors
def push(
    folder: Path = typer.Argument(..., help="A folder written by reshard split."),
    repo_id: str = typer.Argument(..., help="Hub repo to publish to (namespace/name); created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created from main if missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request against main instead of committing."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit (or PR) title."),
    token: Optional[str] = typer.Option(None, help="Hub token with write access (default: stored login / HF_TOKEN).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    """Verify FOLDER, add a model card if it has none, and upload its model files to REPO_ID."""
    from reshard.hub.push import describe, push_folder, quiet_hub_progress

    if quiet or as_json:
        quiet_hub_progress()
    result = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token)
    print_json(result.to_json()) if as_json else typer.echo(describe(result))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
