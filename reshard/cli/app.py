"""The ``reshard`` command line: parse options, call the library, render with rich.

Conventions every command follows (docs/cli.md):

- Every failure is one ``error:`` line on stderr and a non-zero exit: a ``ReshardError``
  (1, or 2 for bad options), an option Typer cannot parse (2), Ctrl-C (130), SIGTERM
  (143); an interrupted run keeps its temporary folder for ``--resume``. With
  ``--json`` stdout also gets ``{"ok": false, "error": "..."}``; a success has
  ``"ok": true``. ``RESHARD_DEBUG=1`` shows the traceback and every log record instead.
- An option that would do nothing in context is refused, not ignored.
- Progress bars (reshard's and huggingface_hub's) appear only on a terminal, never with
  ``-q``/``--json``; output that is not a terminal is not wrapped at 80 columns.
- A closed stdout (``| head -1``) ends the command quietly with status 141, the shell's
  status for SIGPIPE; nothing already written is lost.

Heavy imports happen inside the commands so ``reshard --help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from reshard.api.options import refuse_hub_options_for_local, refuse_unused
from reshard.errors import ReshardError, UsageError

if TYPE_CHECKING:
    from reshard.split import SplitResult

# Typer's own shell completion (--install-completion / --show-completion: bash, zsh, fish).
app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stream large checkpoints into size-bounded safetensors shards, flat in memory.",
)

SOURCE_HELP = (
    "Local folder, file (.safetensors/.bin/index.json), training checkpoint folder "
    "(DeepSpeed ZeRO, PyTorch DCP) or Hub repo id (org/name)."
)
DTYPE_HELP = "bf16, fp16 or fp32 (also BF16, F16, F32 as inspect prints them, or torch's names)."
# 128 + SIGPIPE: what a shell reports for `cat big | head -1`.
CLOSED_PIPE_EXIT = 141
# Reported by --version (from package metadata) next to reshard's own.
VERSION_PACKAGES = ("torch", "safetensors", "huggingface_hub", "transformers")
TAG_HELP = "DeepSpeed checkpoint tag (global_stepN) instead of the one 'latest' names."
CONFIG_HELP = "Folder or Hub repo id to take config.json and tokenizer files from (training checkpoints)."


def _fail(message: str, code: int, as_json: bool = False) -> None:
    if as_json:
        print_json({"ok": False, "error": message}, ok=None)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class _QuietRetries(logging.Filter):
    """huggingface_hub logs every retry of its backoff ("Retrying in 2s [Retry 2/5]", "...
    thrown while requesting HEAD ..."); the one line reshard prints when retries run out is
    what matters. RESHARD_DEBUG=1 shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "Retrying in" in message or "thrown while requesting" in message or "before retry" in message
        )


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
    retries = logging.getLogger("huggingface_hub.utils._http")  # where its backoff logs
    if not any(isinstance(f, _QuietRetries) for f in retries.filters):
        retries.addFilter(_QuietRetries())


def _end_quietly_on_closed_pipe() -> None:
    """The reader went away (``| head -1``): point stdout and stderr at /dev/null so the
    interpreter's last flush cannot complain, and exit like a program killed by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    raise typer.Exit(CLOSED_PIPE_EXIT)


def handle_errors(func):
    """Map reshard's errors (and Ctrl-C, and a closed pipe) to one line and an exit code;
    turn huggingface_hub's bars off unless a person is watching a terminal."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("RESHARD_DEBUG") == "1"
        configure_logging(debug)
        as_json = bool(kwargs.get("as_json"))
        if kwargs.get("quiet") or as_json or not sys.stderr.isatty():
            from reshard.hub.access import quiet_hub_progress

            quiet_hub_progress()
        from reshard.run.signals import interrupt_exit_code, interrupt_message, signals_as_interrupts

        try:
            with signals_as_interrupts():  # SIGTERM unwinds like Ctrl-C (reshard.run.signals)
                return func(*args, **kwargs)
        except BrokenPipeError:
            _end_quietly_on_closed_pipe()
        except ReshardError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code, as_json)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, 130 or 143
            if debug:
                raise
            _fail(interrupt_message(e), interrupt_exit_code(e), as_json)

    return wrapper


def print_json(obj: dict, ok: bool | None = True) -> None:
    """One JSON object on stdout; successes carry ``"ok": true``."""
    typer.echo(json.dumps(obj if ok is None else {"ok": ok, **obj}, indent=2))


def version_lines() -> list[str]:
    """``reshard X.Y.Z`` and the installed versions of the libraries reshard works with,
    read from package metadata: importing torch to ask would take seconds.

    >>> version_lines()[0].startswith("reshard ")
    True
    """
    from importlib.metadata import PackageNotFoundError, version

    from reshard import __version__

    lines = [f"reshard {__version__}"]
    for package in VERSION_PACKAGES:
        try:
            lines.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass  # not installed: nothing to report
    return lines


def _print_version(value: bool) -> None:
    if value:
        typer.echo("\n".join(version_lines()))
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_print_version,
        is_eager=True,
        help="Print reshard's version and those of torch, safetensors, huggingface_hub and transformers.",
    ),
) -> None:
    """Options before the command (``reshard --version``)."""


@app.command()
@handle_errors
def split(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output folder (default ./<name>-resharded)."
    ),
    max_shard: str = typer.Option(
        "5GB", "--max-shard", help="Tensor bytes per shard: 2GB (10^9), 2GiB (2^30) or a byte count."
    ),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(
        None, help="Hub token (default: stored login / HF_TOKEN).", show_default=False
    ),
    dtype: Optional[str] = typer.Option(None, help=f"Convert floating-point tensors: {DTYPE_HELP}"),
    key: Optional[str] = typer.Option(
        None, help="Entry holding the weights in a nested .bin training checkpoint."
    ),
    tag: Optional[str] = typer.Option(None, "--tag", help=TAG_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan, write nothing (repo ids: headers only)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    resume: bool = typer.Option(
        False, "--resume", help="Keep the verified shards of an interrupted run instead of starting over."
    ),
    checksum: bool = typer.Option(
        False,
        "--checksum",
        help="Report each output file's sha256 (in --json, or as sha256sum lines: then stdout holds only those lines).",
    ),
    tp: Optional[int] = typer.Option(
        None,
        "--tp",
        help="Tensor parallel over N GPUs: rank-0/ ... rank-(N-1)/ with each rank's slices, plus tp_plan.json.",
    ),
    pp: Optional[int] = typer.Option(
        None,
        "--pp",
        help="Pipeline parallel over N GPUs: stage-0/ ... with each stage's layers, plus pp_plan.json.",
    ),
    expert_parallel: bool = typer.Option(
        False,
        "--expert-parallel",
        help="With --tp N on a mixture of experts: place whole experts (rank r gets experts [r*E/N, (r+1)*E/N)) instead of splitting each one.",
    ),
    push_to: Optional[str] = typer.Option(
        None,
        "--push-to",
        help="After the split, publish the output to this Hub repo (see `reshard push`); login and options are checked first.",
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to: create the repo private."),
    push_revision: Optional[str] = typer.Option(
        None, "--push-revision", help="With --push-to: branch to commit to."
    ),
    create_pr: bool = typer.Option(False, "--create-pr", help="With --push-to: open a pull request instead."),
    commit_message: Optional[str] = typer.Option(
        None, "--commit-message", help="With --push-to: commit message."
    ),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="q8_0, q4_0 (GGUF for llama.cpp) or fp8 (block-128 safetensors for vLLM/transformers); see docs/quantize.md.",
    ),
    out_format: Optional[str] = typer.Option(
        None,
        "--format",
        help="gguf: GGUF output without quantization (F16/BF16/F32 as --dtype or as stored).",
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="Threads for the CPU work (--dtype casts, --quantize) and shards written at once; same output. Default: one shard at a time, casts/quantization on every CPU (per rank under torchrun); see docs/distributed.md.",
    ),
    no_cache: bool = typer.Option(
        False,
        "--no-cache",
        help="Hub repo ids: stream the weights into the shards by range requests, no copy in the Hub cache (the default when cache + output would not fit); see docs/split.md.",
    ),
    connections: Optional[int] = typer.Option(
        None, "--connections", help="Range requests in flight when streaming from the Hub (default 8)."
    ),
) -> None:
    """Reshard SOURCE into size-bounded safetensors shards plus the index transformers reads."""
    from reshard.api import split as split_job
    from reshard.cli.progress import make_progress
    from reshard.cli.render import make_console, render_split
    from reshard.units import parse_dtype, parse_size

    limit = parse_size(max_shard)
    target_dtype = parse_dtype(dtype) if dtype else None
    if expert_parallel and tp is None:
        raise UsageError(
            "--expert-parallel needs --tp N (experts are placed across the tensor-parallel ranks)"
        )
    if not push_to:
        refuse_unused(
            [
                ("--private", private),
                ("--push-revision", push_revision),
                ("--create-pr", create_pr),
                ("--commit-message", commit_message),
            ],
            "it applies with --push-to REPO_ID",
        )
        refuse_hub_options_for_local(source, revision, token)
    else:
        from reshard.hub.resolve import is_local

        if is_local(source):
            refuse_unused(
                [("--revision", revision)],
                f"{source!r} is a local path (for the branch to push to, use --push-revision)",
            )
    if dry_run:
        refuse_unused(
            [
                ("--push-to", push_to),
                ("--checksum", checksum),
                ("--workers", (workers or 1) > 1),
                ("--no-cache", no_cache),
            ],
            "a dry run writes nothing; drop --dry-run or these",
        )
    if connections is not None:
        from reshard.hub.resolve import is_local
        from reshard.hub.stream import check_connections

        check_connections(connections)
        if is_local(source):
            refuse_unused([("--connections", connections)], f"{source!r} is a local path, not a Hub repo id")
    if quantize or out_format:  # issue 12: quantized / GGUF output (reshard.writers.quantized)
        from reshard.writers.quantized import quantize_option

        quantize_option(quantize, out_format, dtype, tp, pp)  # refused here, before --push-to's login
    if tp is not None or pp is not None:  # per-GPU checkpoints: reshard/parallel
        return _split_parallel(
            source,
            output,
            limit,
            tp,
            pp,
            revision,
            token,
            target_dtype,
            key,
            overwrite,
            as_json,
            quiet,
            resume,
            expert_parallel,
            tag,
            config,
            unsupported=[
                name
                for name, on in (
                    ("--dry-run", dry_run),
                    ("--checksum", checksum),
                    ("--push-to", push_to),
                    ("--workers", (workers or 1) > 1),
                    ("--no-cache", no_cache),
                )
                if on
            ],
        )
    push_token = None
    if push_to:  # everything that can fail before the split writes a byte
        from reshard.hub.push import preflight_push

        push_token = preflight_push(push_to, revision=push_revision, create_pr=create_pr, token=token)
    from reshard.run.distributed import this_rank

    rank = this_rank()  # under torchrun: bars, summary and --json from rank 0 only
    progress = make_progress(quiet or as_json or rank != 0)
    # reshard.split, the Python API (it closes the progress); without --tp/--pp: a SplitResult
    result: SplitResult = split_job(  # type: ignore[assignment]
        source,
        output,
        limit,
        revision=revision,
        token=token,
        dtype=target_dtype,
        key=key,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        resume=resume,
        checksum=checksum,
        quantize=quantize,
        format=out_format,
        tag=tag,
        config=config,
        workers=workers,
        no_cache=True if no_cache else None,
        connections=connections,
    )
    if result.rank != 0:
        share = (result.ranks or [{}])[0]
        typer.echo(
            f"rank {result.rank}: wrote {len(share.get('shards', []))} shards "
            f"({share.get('bytes', 0)} bytes); rank 0 published {result.output}",
            err=True,
        )
        return
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    pushed = None
    if push_to:
        from reshard.hub.push import push_after_split

        pushed = push_after_split(
            result.output,
            push_to,
            token=push_token,
            private=private,
            revision=push_revision,
            create_pr=create_pr,
            commit_message=commit_message,
        )
    if as_json:
        print_json({**result.to_json(), **({"push": pushed.to_json()} if pushed else {})})
        return
    # With sha256sum lines on stdout (`> SHA256SUMS; sha256sum -c SHA256SUMS`), everything
    # for people goes to stderr.
    checksums = result.checksums
    lines_only = checksums is not None
    if not quiet:
        render_split(result, make_console(stderr=lines_only))
    if checksums is not None:
        for name, digest in checksums.items():
            typer.echo(f"{digest}  {name}")  # sha256sum's format: `sha256sum -c` reads it
    if pushed:
        from reshard.hub.push import describe

        typer.echo(describe(pushed), err=lines_only)


@app.command()
@handle_errors
def inspect(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(None, help="Hub token.", show_default=False),
    key: Optional[str] = typer.Option(None, help="Entry holding the weights in a nested .bin checkpoint."),
    tag: Optional[str] = typer.Option(None, "--tag", help=TAG_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Tensor count, parameters by dtype, total bytes, largest tensor and current shards
    (repo ids: safetensors headers only, by range requests)."""
    from reshard.api import inspect as inspect_job
    from reshard.cli.render import render_inspect

    refuse_hub_options_for_local(source, revision, token)
    result = inspect_job(
        source,
        revision=revision,
        token=token,
        key=key,
        tag=tag,
        config=config,
        on_warning=lambda message: typer.echo(f"warning: {message}", err=True),
    )
    print_json(result.to_json()) if as_json else render_inspect(result.to_json())


@app.command()
@handle_errors
def verify(
    folder: Path = typer.Argument(..., help="A folder written by reshard split."),
    against: Optional[str] = typer.Option(None, help="Also compare every tensor's bytes to this source."),
    key: Optional[str] = typer.Option(
        None, help="With --against: entry holding the weights in a nested .bin source."
    ),
    tag: Optional[str] = typer.Option(None, "--tag", help="With --against: " + TAG_HELP),
    config: Optional[str] = typer.Option(None, "--config", help="With --against: " + CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Check that index and files agree, headers are valid and (with --against) bytes match."""
    from reshard.api import verify as verify_job
    from reshard.units import format_size

    report = verify_job(folder, against, key=key, tag=tag, config=config)
    if as_json:
        print_json(report.to_json())
        return
    compared = f", {format_size(report.compared_bytes)} compared with {against}" if against else ""
    typer.echo(
        f"ok: {report.tensors} tensors in {len(report.files)} files, "
        f"{format_size(report.total_size)}{compared}"
    )


@app.command()
@handle_errors
def bench(
    sources: Optional[list[str]] = typer.Argument(
        None,
        help="BEFORE AFTER, or one SOURCE to reshard with --max-shard, or none for the demo model (.bin shards vs its 2GB safetensors reshard).",
    ),
    max_shard: Optional[str] = typer.Option(
        None, "--max-shard", help="Reshard a single SOURCE at this size (default 5GB) and compare."
    ),
    loader: Optional[list[str]] = typer.Option(
        None,
        "--loader",
        help="safetensors, torch, torch-mmap, transformers (repeatable; default: all installed).",
    ),
    cache: Optional[str] = typer.Option(
        None, help="Page cache before each trial: cold, warm or both (default both; warm for the demo)."
    ),
    repeats: Optional[int] = typer.Option(None, help="Trials per side, loader and cache mode (default 3)."),
    device: str = typer.Option("cpu", help="cpu, or cuda to move the weights to the GPU."),
    plot: Optional[Path] = typer.Option(
        None, help="Write a PNG of load time and peak memory (needs matplotlib)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print every trial's raw figures as JSON."),
) -> None:
    """Load time and peak RAM of a checkpoint before vs after resharding, in fresh processes
    (no SOURCE: the demo model's .bin shards, as its original repo ships them, vs its 2GB
    safetensors reshard)."""
    from reshard.bench.measure import bench_checkpoints, default_settings
    from reshard.bench.render import render_bench
    from reshard.cli.render import make_console
    from reshard.units import parse_size

    def on_trial(done: int, total: int, trial: dict) -> None:
        typer.echo(
            f"trial {done}/{total}: {trial['side']} {trial['loader']} {trial['cache']} "
            f"{trial['load_s']:.2f}s",
            err=True,
        )

    loader, cache, repeats = default_settings(sources or [], loader, cache, repeats)
    result = bench_checkpoints(
        sources or [],
        max_shard_size=parse_size(max_shard) if max_shard else None,
        loaders=loader,
        cache=cache,
        repeats=repeats,
        device=device,
        on_trial=on_trial,
    )
    data = result.to_json()
    if plot:
        from reshard.bench.plot import plot_bench

        plot_bench(data, plot)
    print_json(data) if as_json else render_bench(data, make_console())
    if plot:
        typer.echo(f"plot: {plot.absolute()}", err=as_json)


def _split_parallel(
    source,
    output,
    limit,
    tp,
    pp,
    revision,
    token,
    dtype,
    key,
    overwrite,
    as_json,
    quiet,
    resume: bool,
    expert_parallel: bool,
    tag,
    config,
    unsupported: list[str],
) -> None:
    from reshard.api import split as split_job
    from reshard.cli.progress import make_progress
    from reshard.parallel.render import render_parallel_split

    if unsupported:
        raise UsageError(
            f"{', '.join(unsupported)} does not apply with --tp/--pp yet; `reshard plan` previews the split"
        )
    progress = make_progress(quiet or as_json)
    result = split_job(  # reshard.split: the Python API (it closes the progress)
        source,
        output,
        limit,
        tp=tp,
        pp=pp,
        revision=revision,
        token=token,
        dtype=dtype,
        key=key,
        tag=tag,
        config=config,
        overwrite=overwrite,
        progress=progress,
        resume=resume,
        expert_parallel=expert_parallel,
    )
    _report(result, as_json, quiet, render_parallel_split)


def _report(result, as_json: bool, quiet: bool, render) -> None:
    """Warnings on stderr, then the result: JSON, or the rendered summary unless quiet."""
    from reshard.cli.render import make_console

    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(result.to_json())
    elif not quiet:
        render(result, make_console())


@app.command()
@handle_errors
def plan(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    gpus: int = typer.Option(1, "--gpus", help="Number of GPUs to spread the model over."),
    strategy: str = typer.Option(
        "pipeline", "--strategy", help="pipeline (whole layers per GPU) or tensor (every layer split)."
    ),
    context: int = typer.Option(
        4096, "--context", help="Tokens of context per sequence (sizes the KV cache)."
    ),
    batch: int = typer.Option(1, "--batch", help="Sequences at once."),
    gpu_memory: Optional[str] = typer.Option(
        None,
        "--gpu-memory",
        help="Memory per GPU (80GB, 24GiB): say whether it fits and the fewest GPUs that would.",
    ),
    dtype: Optional[str] = typer.Option(None, help=f"Run the weights in {DTYPE_HELP} (default: as stored)."),
    device_map: Optional[Path] = typer.Option(
        None,
        "--device-map",
        help="Write the pipeline plan as a transformers/accelerate device_map JSON file.",
    ),
    expert_parallel: bool = typer.Option(
        False,
        "--expert-parallel",
        help="With --strategy tensor on a mixture of experts: whole experts per GPU instead of a slice of each.",
    ),
    headroom: str = typer.Option(
        "1GB",
        "--headroom",
        help="Memory per GPU kept free for the CUDA context and allocator (0 for none); counted in the fit verdict.",
    ),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    token: Optional[str] = typer.Option(None, help="Hub token.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Per-GPU weights, KV cache and activations for SOURCE over N GPUs (headers and config.json only)."""
    from reshard.api import plan as plan_job
    from reshard.cli.render import make_console
    from reshard.parallel.render import render_plan

    result = plan_job(
        source,
        gpus,
        strategy=strategy,
        context=context,
        batch=batch,
        gpu_memory=gpu_memory,
        dtype=dtype,
        headroom=headroom,
        expert_parallel=expert_parallel,
        device_map=device_map,
        revision=revision,
        token=token,
    )
    if as_json:
        print_json(result.to_json())
    else:
        render_plan(result, device_map, make_console())


@app.command()
@handle_errors
def merge(
    folder: Path = typer.Argument(..., help="A folder written by reshard split --tp N or --pp N."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the merged checkpoint."),
    max_shard: str = typer.Option(
        "5GB", "--max-shard", help="Tensor bytes per shard: 2GB (10^9), 2GiB (2^30) or a byte count."
    ),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    resume: bool = typer.Option(
        False, help="Keep the verified shards of an interrupted merge into the same -o."
    ),
) -> None:
    """Reassemble tensor- or pipeline-parallel outputs into one ordinary checkpoint."""
    from reshard.api import merge as merge_job
    from reshard.cli.progress import make_progress
    from reshard.parallel.render import render_merge

    progress = make_progress(quiet or as_json)
    result = merge_job(folder, output, max_shard, overwrite=overwrite, resume=resume, progress=progress)
    _report(result, as_json, quiet, render_merge)


@app.command()
@handle_errors
def push(
    folder: Path = typer.Argument(..., help="A folder written by reshard split."),
    repo_id: str = typer.Argument(..., help="Hub repo to publish to (namespace/name); created if missing."),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing repo keeps its visibility)."
    ),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created from main if missing)."),
    create_pr: bool = typer.Option(
        False, "--create-pr", help="Open a pull request against main instead of committing."
    ),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit (or PR) title."),
    token: Optional[str] = typer.Option(
        None, help="Hub token with write access (default: stored login / HF_TOKEN).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    """Verify FOLDER and upload its model files to REPO_ID, with a generated model card if
    it has no README.md (FOLDER itself is not modified)."""
    from reshard.api import push as push_job
    from reshard.hub.push import describe

    result = push_job(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
    )
    print_json(result.to_json()) if as_json else typer.echo(describe(result))


def _usage_error_line(error) -> str:
    """Click's message for an option it could not parse, on one line, with where to look.

    >>> _usage_error_line(typer.BadParameter("'two' is not a valid integer."))
    "Invalid value: 'two' is not a valid integer."
    """
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message


def main(args: list[str] | None = None) -> None:
    """Console-script entry point. Typer runs in non-standalone mode so option-parsing
    errors come back here and are printed as one ``error:`` line like every other error
    (Typer's own rendering is a five-line box)."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        code = app(args=argv, prog_name="reshard", standalone_mode=False)
    except typer.TyperException as e:  # Typer's parsing errors (its vendored click's)
        if type(e).__name__ == "NoArgsIsHelpError":  # `reshard` alone: the help is printed
            code = e.exit_code
        else:
            message = _usage_error_line(e)
            if "--json" in argv:
                print_json({"ok": False, "error": message}, ok=None)
            typer.echo(f"error: {message}", err=True)
            code = e.exit_code
    except typer.Abort as e:  # an interrupt outside a command (Click wraps it)
        from reshard.run.signals import interrupt_exit_code, interrupt_message

        cause = e.__cause__ or e.__context__ or KeyboardInterrupt()
        typer.echo(f"error: {interrupt_message(cause)}", err=True)
        code = interrupt_exit_code(cause)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
