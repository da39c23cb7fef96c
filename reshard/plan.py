"""Pure shard planning: sizes in, plan out. No file is touched here.

Tensors are taken in the order given (natural order, so a layer's tensors land
together) and a new shard starts when the next tensor would push the current one over
the limit. A single tensor larger than the limit gets a shard of its own, as every peer
does. File names come from the output format (``reshard.writers``); by default
safetensors' ``model-00001-of-00003.safetensors``, or a single ``model.safetensors`` (and
no index) when everything fits in one.

>>> plan = plan_shards([("a", 6), ("b", 5), ("c", 4)], max_shard_size=10)
>>> [(s.file_name, s.names) for s in plan.shards]
[('model-00001-of-00002.safetensors', ('a',)), ('model-00002-of-00002.safetensors', ('b', 'c'))]
>>> plan_shards([("a", 3)], 10).shards[0].file_name
'model.safetensors'

Given each tensor's source file (``origins``), a shard that would straddle two files
ends at the file boundary instead, whenever that costs no extra shard: on XFS and btrfs
a shard drawn from one file shares all its blocks with it, while the part of a
straddling shard from the other file has to be copied (its offsets cannot be congruent
with both files). Greedy packing would give ``[a b] [c]`` here; ``a`` and ``b`` come from
different files and two shards are needed either way, so the break moves:

>>> plan = plan_shards([("a", 4), ("b", 4), ("c", 4)], 10, origins=["f1", "f2", "f2"])
>>> [s.names for s in plan.shards]
[('a',), ('b', 'c')]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from reshard.errors import UsageError

# (number, count) -> file name; count == 1 names the single-file output.
ShardNaming = Callable[[int, int], str]


@dataclass(frozen=True)
class PlannedShard:
    """One output file: its name, tensor names in plan order, and tensor bytes."""

    file_name: str
    names: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class ShardPlan:
    """The whole plan.

    Attributes:
        shards: output files in order.
        max_shard_size: the limit the plan was made for, in bytes.
        oversized: names of tensors larger than the limit (each alone in its shard).
    """

    shards: tuple[PlannedShard, ...]
    max_shard_size: int
    oversized: tuple[str, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def is_sharded(self) -> bool:
        """False when the result is a single ``model.safetensors`` with no index."""
        return len(self.shards) > 1

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, as the index JSON stores it."""
        return {name: s.file_name for s in self.shards for name in s.names}


def plan_shards(
    sizes: Sequence[tuple[str, int]],
    max_shard_size: int,
    naming: ShardNaming | None = None,
    origins: Sequence[Hashable | None] | None = None,
) -> ShardPlan:
    """Group ``(name, nbytes)`` pairs, in order, into shards of at most ``max_shard_size``,
    named by ``naming`` (default: the safetensors format's names).

    ``origins``: per tensor, the file its bytes can be shared from by reference (``None``
    where they cannot: converted, quantized or strided tensors). With it, a shard ends at
    a change of origin where that keeps the shard count of plain greedy packing (the
    fewest possible), so fewer shards mix files. The plan depends only on names, sizes and
    origins, never on the filesystem.

    Raises:
        UsageError: a non-positive limit, or no tensors.
    """
    if naming is None:
        from reshard.writers.safetensors import SAFETENSORS

        naming = SAFETENSORS.shard_file_name
    if max_shard_size <= 0:
        raise UsageError(f"max shard size must be positive, got {max_shard_size}")
    if not sizes:
        raise UsageError("nothing to plan: the checkpoint has no tensors")
    if origins is not None and len(origins) != len(sizes):
        raise ValueError(f"{len(origins)} origins for {len(sizes)} tensors")
    nbytes = [n for _, n in sizes]
    ends = _shard_ends(nbytes, max_shard_size, origins)
    count = len(ends)
    shards = []
    start = 0
    for i, end in enumerate(ends, start=1):
        group = sizes[start:end]
        shards.append(PlannedShard(naming(i, count), tuple(n for n, _ in group), sum(b for _, b in group)))
        start = end
    oversized = tuple(name for name, n in sizes if n > max_shard_size)
    return ShardPlan(tuple(shards), max_shard_size, oversized)


def _shard_ends(nbytes: Sequence[int], limit: int, origins: Sequence[Hashable | None] | None) -> list[int]:
    """Shard ends (exclusive) of greedy packing: tensors are added until the next would pass
    the limit, and a shard always takes at least one. With ``origins``, a shard which would
    mix origins ends at its first change of origin whenever the rest still fits in greedy's
    shard count.

    Greedy packing gives the fewest shards for tensors in order, so the count never grows.
    A change of origin is a tensor whose origin differs from the last known one before it
    (``None`` changes nothing). Linear time: greedy's shard end and shard count from every
    position are computed once (two pointers over prefix sums, then backwards).
    """
    count = len(nbytes)
    prefix = [0]
    for n in nbytes:
        prefix.append(prefix[-1] + n)
    greedy_end = []  # greedy_end[p]: end of the greedy shard starting at p (>= p + 1)
    end = 0
    for p in range(count):
        end = max(end, p + 1)
        while end < count and prefix[end + 1] - prefix[p] <= limit:
            end += 1
        greedy_end.append(end)
    shards_from = [0] * (count + 1)  # shards_from[p]: greedy's shard count for p..end
    for p in range(count - 1, -1, -1):
        shards_from[p] = 1 + shards_from[greedy_end[p]]
    ends: list[int] = []
    start = 0
    while start < count:
        end = greedy_end[start]
        change = _first_origin_change(origins, start, end) if origins else None
        if change is not None and len(ends) + 1 + shards_from[change] <= shards_from[0]:
            end = change
        ends.append(end)
        start = end
    return ends


def _first_origin_change(origins: Sequence[Hashable | None], start: int, end: int) -> int | None:
    """Index of the first tensor in ``start..end`` whose origin differs from an earlier one
    in that range, or None when the range has one origin (ignoring ``None``)."""
    seen = None
    for i in range(start, end):
        origin = origins[i]
        if origin is None:
            continue
        if seen is None:
            seen = origin
        elif origin != seen:
            return i
    return None
