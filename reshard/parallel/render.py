"""rich rendering of parallel plans, splits and merges for people; ``--json`` bypasses it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reshard.units import format_size


def render_plan(plan, device_map_path=None, console: Console | None = None) -> None:
    """Per-GPU table of a ``ParallelPlan`` plus the fit verdict."""
    console = console or Console()
    s = plan.shape
    attention = (
        f"MLA (latent {s.kv_lora_rank} + rope {s.qk_rope_head_dim}), {s.heads} heads"
        if s.mla
        else f"{s.heads} heads / {s.kv_heads} KV heads x {s.head_dim}"
    )
    console.print(
        f"[bold]{plan.source}[/bold] ({plan.family.name} family): {s.layers} layers, "
        f"hidden {s.hidden}, {attention}, vocab {s.vocab}"
    )
    total, active = plan.parameters
    extras = []
    if s.experts:
        extras.append(
            f"{s.experts} experts, {s.experts_per_token} per token: "
            f"{_count(total)} parameters, {_count(active)} active"
        )
    if s.sliding_window:
        sliding = sum(t == "sliding_attention" for t in s.layer_types)
        extras.append(f"{sliding} of {s.layers} layers attend to the last {s.sliding_window} tokens")
    for line in extras:
        console.print(line)
    ep = ", expert parallel" if plan.expert_parallel else ""
    console.print(
        f"{plan.strategy} parallel{ep} over {plan.gpus} GPU(s), {plan.compute_dtype}, "
        f"batch {plan.batch}, context {plan.context}"
    )
    table = Table(title_justify="left")
    for column in ("gpu", "holds", "weights", "KV cache", "activations", "total"):
        table.add_column(column, justify="left" if column == "holds" else "right")
    for g in plan.per_gpu:
        table.add_row(
            str(g.gpu),
            g.holds,
            format_size(g.weights),
            format_size(g.kv_cache),
            format_size(g.activations),
            format_size(g.total),
        )
    console.print(table)
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        fewest = (
            f"fewest GPUs that fit with this strategy: {plan.min_gpus}"
            if plan.min_gpus
            else "no GPU count fits with this strategy"
        )
        console.print(
            f"{verdict} in {format_size(plan.gpu_memory)} per GPU: largest total "
            f"{format_size(plan.largest)} + {format_size(plan.headroom)} headroom "
            f"(CUDA context, allocator; --headroom); {fewest}"
        )
    for note in plan.notes:
        console.print(note)
    if device_map_path is not None:
        console.print(f"device map written to {device_map_path}")


def _count(n: int) -> str:
    """``46.70B`` style parameter count."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render_parallel_split(result, console: Console | None = None) -> None:
    """One line per rank/stage folder of a ``ParallelSplitResult``."""
    console = console or Console()
    console.print(f"wrote {result.output} ({result.strategy} parallel)")
    table = Table()
    for column in ("folder", "tensors", "shards", "size"):
        table.add_column(column, justify="left" if column == "folder" else "right")
    for name, ckpt, plan in result.parts:
        table.add_row(name, str(len(ckpt.tensors)), str(len(plan.shards)), format_size(plan.total_size))
    console.print(table)


def render_merge(result, console: Console | None = None) -> None:
    """One line for a ``MergeResult``."""
    (console or Console()).print(
        f"wrote {result.output}: {result.tensors} tensors in {len(result.shards)} "
        f"shard(s), {format_size(result.total_size)} (merged from {result.strategy} "
        "parallel)"
    )
