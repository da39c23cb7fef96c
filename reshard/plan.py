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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    sizes: Sequence[tuple[str, int]], max_shard_size: int, naming: ShardNaming | None = None
) -> ShardPlan:
    """Group ``(name, nbytes)`` pairs, in order, into shards of at most ``max_shard_size``,
    named by ``naming`` (default: the safetensors format's names).

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
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    current_size = 0
    oversized = []
    for name, nbytes in sizes:
        if nbytes > max_shard_size:
            oversized.append(name)
        if current and current_size + nbytes > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append((name, nbytes))
        current_size += nbytes
    groups.append(current)
    count = len(groups)
    shards = tuple(
        PlannedShard(naming(i, count), tuple(name for name, _ in group), sum(nbytes for _, nbytes in group))
        for i, group in enumerate(groups, start=1)
    )
    return ShardPlan(shards, max_shard_size, tuple(oversized))
