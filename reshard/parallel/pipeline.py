"""Pipeline parallelism: whole layers per GPU, stages balanced by bytes (pure, no I/O).

The first stage also holds the embedding, the last the final norm and the output head.
With tied embeddings (``tie_word_embeddings``, no ``lm_head`` in the checkpoint) the last
stage needs the embedding matrix too, as its head: engines (vLLM) and accelerate's
dispatch keep a copy there, so its bytes count on both end stages.
Layers stay contiguous and in order; among all ways to cut them into ``stages`` runs of
at least one layer, the one whose heaviest stage is lightest is chosen (exact, by
dynamic programming over prefix sums), so the embedding and head weigh in: stages are
balanced by bytes, not by layer count.

>>> balance_layers([10] * 6, 3, first=0, last=0)
[2, 2, 2]
>>> balance_layers([10] * 6, 3, first=15, last=0)  # a heavy embedding: stage 0 gets fewer layers
[1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reshard.errors import UsageError
from reshard.parallel.arch import Family


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        index: 0-based stage (GPU) number.
        layers: the layer numbers it holds, contiguous and ascending.
        names: tensor names it holds, in the order given to the planner.
        nbytes: bytes of the checkpoint tensors it holds (``names``).
        first: holds the embedding (stage 0); last: holds the final norm and head.
        tied_head: bytes of the copy of the tied embedding a last stage holds as its
            head (0 when the head is its own tensor, or stage 0 is also the last).
    """

    index: int
    layers: tuple[int, ...]
    names: tuple[str, ...]
    nbytes: int
    first: bool
    last: bool
    tied_head: int = 0

    @property
    def weight_bytes(self) -> int:
        """Weight bytes on the GPU: its tensors plus a tied head's copy."""
        return self.nbytes + self.tied_head

    def describe(self) -> str:
        """``embedding, layers 0-7`` style summary."""
        parts = ["embedding"] if self.first else []
        parts.append(
            f"layers {self.layers[0]}-{self.layers[-1]}"
            if len(self.layers) > 1
            else f"layer {self.layers[0]}"
        )
        if self.last:
            parts.append("norm + head (tied: a copy of the embedding)" if self.tied_head else "norm + head")
        return ", ".join(parts)


@dataclass(frozen=True)
class PipelinePlan:
    """Stages in order; ``stage_of`` maps a tensor name to its stage."""

    stages: tuple[Stage, ...]

    def stage_of(self) -> dict[str, int]:
        return {name: s.index for s in self.stages for name in s.names}


def balance_layers(layer_sizes: Sequence[int], stages: int, first: int, last: int) -> list[int]:
    """Layers per stage minimising the heaviest stage, where stage 0 also carries ``first``
    bytes and the last stage ``last`` bytes. Ties go to the earliest cut (earlier stages
    lighter). Every stage gets at least one layer.

    Raises:
        UsageError: fewer layers than stages, or fewer than one stage.
    """
    n = len(layer_sizes)
    if stages < 1:
        raise UsageError(f"--pp/--gpus must be at least 1, got {stages}")
    if stages > n:
        raise UsageError(f"{stages} pipeline stages but the model has only {n} layers; use at most {n}")
    prefix = [0]
    for size in layer_sizes:
        prefix.append(prefix[-1] + size)

    def cost(stage: int, i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (first if stage == 0 else 0) + (last if stage == stages - 1 else 0)

    inf = float("inf")
    # best[s][j]: lightest possible heaviest stage when stages 0..s hold layers 0..j-1.
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], cost(s, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(stages - 1, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def plan_pipeline(
    sizes: Sequence[tuple[str, int]], family: Family, stages: int, tied_head: int = 0
) -> PipelinePlan:
    """Assign every ``(name, nbytes)`` to a stage.

    Layer tensors go with their layer; the family's last modules (final norm, head) with
    the last stage; everything else (embedding) with stage 0. ``tied_head`` is the size
    of a tied embedding the last stage must also hold as its head (weighed in the
    balance, and counted on that stage when it is not stage 0).

    Raises:
        UsageError: no layer tensors, layers not numbered 0..L-1, or more stages than layers.
    """
    layer_bytes: dict[int, int] = {}
    first = last = 0
    for name, nbytes in sizes:
        layer = family.layer_of(name)
        if layer is not None:
            layer_bytes[layer] = layer_bytes.get(layer, 0) + nbytes
        elif family.is_last(name):
            last += nbytes
        else:
            first += nbytes
    if not layer_bytes:
        raise UsageError(f"no tensor names match {family.layers_module}.N.*; cannot make pipeline stages")
    numbers = sorted(layer_bytes)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        raise UsageError(
            f"layer {missing[0]} has no tensors (layers must be numbered 0.."
            f"{numbers[-1]}); the checkpoint is incomplete"
        )
    counts = balance_layers(
        [layer_bytes[i] for i in numbers], stages, first, last + (tied_head if stages > 1 else 0)
    )
    bounds: list[tuple[int, ...]] = []
    start = 0
    for count in counts:
        bounds.append(tuple(range(start, start + count)))
        start += count
    stage_of_layer = {layer: s for s, layers in enumerate(bounds) for layer in layers}
    names: list[list[str]] = [[] for _ in counts]
    stage_bytes = [0] * len(counts)
    for name, size in sizes:
        layer = family.layer_of(name)
        s = stage_of_layer[layer] if layer is not None else (len(counts) - 1 if family.is_last(name) else 0)
        names[s].append(name)
        stage_bytes[s] += size
    last_index = len(counts) - 1
    return PipelinePlan(
        tuple(
            Stage(
                s,
                bounds[s],
                tuple(names[s]),
                stage_bytes[s],
                s == 0,
                s == last_index,
                tied_head if s == last_index and s > 0 else 0,
            )
            for s in range(len(counts))
        )
    )
