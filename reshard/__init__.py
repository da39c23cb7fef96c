"""reshard: stream large checkpoints into size-bounded safetensors shards with flat memory.

The library is usable from Python (docs/python.md); the ``reshard`` CLI calls the same
functions::

    import reshard
    result = reshard.split("./my-model", "./my-model-2GB", max_shard="2GB")
    print(result.to_json()["shards"])

Every name in ``__all__`` is imported on first use, so ``import reshard`` loads nothing
heavy (no torch, numpy, typer or huggingface_hub).

>>> import reshard
>>> reshard.split.__module__, reshard.ReshardError.__name__
('reshard.api', 'ReshardError')
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    # The job functions (reshard/api).
    "split": "reshard.api",
    "inspect": "reshard.api",
    "verify": "reshard.api",
    "plan": "reshard.api",
    "merge": "reshard.api",
    "push": "reshard.api",
    # What they return: frozen dataclasses with to_json().
    "SplitResult": "reshard.split",
    "ParallelSplitResult": "reshard.parallel.split_parallel",
    "InspectResult": "reshard.summary",
    "VerifyReport": "reshard.run.verify",
    "ParallelPlan": "reshard.parallel.planner",
    "MergeResult": "reshard.parallel.merge",
    "PushResult": "reshard.hub.push",
    # Progress: the events protocol and its adapters.
    "Progress": "reshard.run.events",
    "CallbackProgress": "reshard.api.progress",
    "TqdmProgress": "reshard.api.progress",
    "RichProgress": "reshard.api.progress",
    # The error hierarchy.
    "ReshardError": "reshard.errors",
    "UsageError": "reshard.errors",
    "SourceError": "reshard.errors",
    "FormatError": "reshard.errors",
    "UnsafePickleError": "reshard.errors",
    "OutputError": "reshard.errors",
    "LockedError": "reshard.errors",
    "VerifyError": "reshard.errors",
    "HubError": "reshard.errors",
    "BenchError": "reshard.errors",
}

__all__ = [
    "__version__",
    "split",
    "inspect",
    "verify",
    "plan",
    "merge",
    "push",
    "SplitResult",
    "ParallelSplitResult",
    "InspectResult",
    "VerifyReport",
    "ParallelPlan",
    "MergeResult",
    "PushResult",
    "Progress",
    "CallbackProgress",
    "TqdmProgress",
    "RichProgress",
    "ReshardError",
    "UsageError",
    "SourceError",
    "FormatError",
    "UnsafePickleError",
    "OutputError",
    "LockedError",
    "VerifyError",
    "HubError",
    "BenchError",
]

if TYPE_CHECKING:
    from reshard.api import inspect, merge, plan, push, split, verify
    from reshard.api.progress import CallbackProgress, RichProgress, TqdmProgress
    from reshard.errors import (
        BenchError,
        FormatError,
        HubError,
        LockedError,
        OutputError,
        ReshardError,
        SourceError,
        UnsafePickleError,
        UsageError,
        VerifyError,
    )
    from reshard.hub.push import PushResult
    from reshard.parallel.merge import MergeResult
    from reshard.parallel.planner import ParallelPlan
    from reshard.parallel.split_parallel import ParallelSplitResult
    from reshard.run.events import Progress
    from reshard.run.verify import VerifyReport
    from reshard.split import SplitResult
    from reshard.summary import InspectResult


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reshard' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``reshard.split`` and ``reshard.plan`` are the API functions, yet reshard/split.py
    and reshard/plan.py are modules too, and importing a submodule makes Python set it as
    an attribute of its package, which would hide the function. This keeps the function;
    the modules stay importable as usual (``from reshard.split import split_checkpoint``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
