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


def handle_errors(func):
    """Map reshard's errors (and Ctrl-C) to one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("RESHARD_DEBUG") == "1"
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
) -> None:
    """Reshard SOURCE into size-bounded safetensors shards plus the index transformers reads."""
    from reshard.checkpoint import parse_dtype
    from reshard.progress import make_progress
    from reshard.render import render_split
    from reshard.split import split_checkpoint
    from reshard.units import parse_size

    limit = parse_size(max_shard)
    progress = make_progress(quiet or as_json)
    try:
        result = split_checkpoint(source, output, limit, revision=revision, token=token,
                                  dtype=parse_dtype(dtype) if dtype else None, key=key,
                                  overwrite=overwrite, dry_run=dry_run, progress=progress)
    finally:
        getattr(progress, "close", lambda: None)()
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(result.to_json())
    elif not quiet:
        render_split(result)


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
    from reshard.checkpoint import load_checkpoint
    from reshard.inspect import summarize
    from reshard.render import render_inspect
    from reshard.source import resolve_source

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
    from reshard.checkpoint import load_checkpoint
    from reshard.source import resolve_source
    from reshard.units import format_size
    from reshard.verify import verify_folder

    source = load_checkpoint(resolve_source(against), key=key) if against else None
    report = verify_folder(folder, source)
    if as_json:
        print_json(report.to_json())
        return
    compared = f", {format_size(report.compared_bytes)} compared with {against}" if against else ""
    typer.echo(f"ok: {report.tensors} tensors in {len(report.files)} files, "
               f"{format_size(report.total_size)}{compared}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
