"""Checks of option values shared by the Python API and the CLI (one message each).

Messages name the CLI option (``--revision``); in Python it is the keyword argument of
the same name in snake_case (``revision=``).
"""

from __future__ import annotations

from reshard.errors import UsageError


def refuse_unused(options: list[tuple[str, object]], why: str) -> None:
    """Refuse options that were given but would do nothing, in one line.

    >>> refuse_unused([("--private", True), ("--create-pr", False)], "they apply with --push-to")
    Traceback (most recent call last):
    ...
    reshard.errors.UsageError: --private does nothing here: they apply with --push-to
    """
    given = [name for name, value in options if value not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} does nothing here: {why}")


def refuse_hub_options_for_local(source: str, revision: str | None, token: str | None) -> None:
    """``--revision``/``--token`` only mean something for a Hub repo id."""
    from reshard.hub.resolve import is_local

    if is_local(source):
        refuse_unused(
            [("--revision", revision), ("--token", token)],
            f"{source!r} is a local path and these apply to Hub repo ids; drop them",
        )


def size_option(value: int | str, zero_allowed: bool = False) -> int:
    """Bytes from ``2GB``/``2GiB``/a count, or an int as is (``0`` where allowed).

    >>> size_option("2GB"), size_option(1500), size_option("0", zero_allowed=True)
    (2000000000, 1500, 0)
    """
    from reshard.units import parse_size

    if zero_allowed and str(value).strip() == "0":
        return 0
    return parse_size(value)
