"""Training checkpoints as sources: DeepSpeed ZeRO (stages 1-3) and PyTorch DCP (FSDP2,
torchtitan, accelerate's ``pytorch_model_fsdp_0/``, ``HuggingFaceStorageWriter``).

``find_training_checkpoint(path)`` says whether a folder is one (an HF Trainer
``checkpoint-N/`` folder holding either counts, with its config.json beside);
``load_training_checkpoint`` describes its weights as tensors over byte ranges of the
training stack's own files. Optimizer state is never read, only counted.

>>> find_training_checkpoint(Path("no/such/folder")) is None
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reshard.formats.training.dcp import (
    is_dcp_folder,
    is_dcp_safetensors_folder,
    load_dcp,
    load_dcp_safetensors,
)
from reshard.formats.training.layout import TrainingState, model_folder
from reshard.formats.training.zero import is_zero_folder, load_zero

# accelerate's FSDP SHARDED_STATE_DICT folder name inside a checkpoint (model 0).
ACCELERATE_MODEL_DIR = "pytorch_model_fsdp_0"


@dataclass(frozen=True)
class TrainingSource:
    """Where a training checkpoint's state and its model files are.

    Attributes:
        kind: ``"dcp"``, ``"dcp-safetensors"`` or ``"deepspeed"``.
        state_dir: the folder with ``.metadata`` / the DeepSpeed ``latest`` and tags.
        root: the folder the user named (an HF Trainer ``checkpoint-N/``, or ``state_dir``).
    """

    kind: str
    state_dir: Path
    root: Path


def find_training_checkpoint(path: Path) -> TrainingSource | None:
    """Recognise a training checkpoint folder, or ``None``.

    - DCP: ``.metadata`` in the folder, or in its ``pytorch_model_fsdp_0/`` (accelerate);
    - DCP safetensors: ``*.safetensors`` with ``DCP_SHARDING_INFO`` headers;
    - DeepSpeed: ``latest`` or a tag folder (``global_stepN/``) of ZeRO state files.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if is_dcp_folder(path):
        return TrainingSource("dcp", path, path)
    if is_dcp_folder(path / ACCELERATE_MODEL_DIR):
        return TrainingSource("dcp", path / ACCELERATE_MODEL_DIR, path)
    if is_zero_folder(path):
        return TrainingSource("deepspeed", path, path)
    if is_dcp_safetensors_folder(path):
        return TrainingSource("dcp-safetensors", path, path)
    return None


def load_training_checkpoint(
    source: TrainingSource, tag: str | None = None, config: str | None = None
) -> TrainingState:
    """Describe the weights of a training checkpoint (no tensor byte is read).

    Args:
        tag: DeepSpeed tag (default: what ``latest`` names).
        config: a folder or Hub repo id with config.json and tokenizer files, used instead
            of those beside the checkpoint.

    Raises:
        ReshardError: one line naming the file at fault and what to do.
    """
    from reshard.errors import UsageError

    if tag is not None and source.kind != "deepspeed":
        raise UsageError("--tag only applies to DeepSpeed checkpoints")
    model = model_folder(_model_candidates(source), config)
    if source.kind == "deepspeed":
        state = load_zero(source.state_dir, model, tag)
    elif source.kind == "dcp":
        state = load_dcp(source.state_dir, model)
    else:
        state = load_dcp_safetensors(source.state_dir, model)
    if model.config is None:
        state.warnings.append(
            f"{source.root}: no config.json beside the checkpoint; writing the "
            "weights only (pass --config FOLDER|REPO_ID to add the model's config "
            "and tokenizer)"
        )
    return state


def _model_candidates(source: TrainingSource) -> list[Path]:
    """Where an HF Trainer / accelerate / torchtitan run keeps config.json: the folder
    itself, then up to two parents (``checkpoint-N/`` is inside the output folder)."""
    folders = [source.root, source.state_dir]
    folders += [source.root.parent, source.root.parent.parent]
    seen, out = set(), []
    for f in folders:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def to_checkpoint(state: TrainingState):
    """The ``Checkpoint`` every downstream step consumes."""
    from reshard.tensors import Checkpoint

    return Checkpoint(
        tuple(state.tensors),
        tuple(state.weight_files),
        {},
        tuple(state.model.files),
        state.format,
        dict(state.dropped),
        tuple(state.warnings),
        dict(state.skipped),
        dict(state.facts),
    )


def _loader(kind: str):
    def load(source, options):
        found = find_training_checkpoint(Path(source.root))
        if found is None or found.kind != kind:
            from reshard.errors import SourceError

            raise SourceError(f"{source.spec}: not a {kind} checkpoint folder")
        return to_checkpoint(load_training_checkpoint(found, tag=options.tag, config=options.config))

    return load


def _detects(kind: str):
    def detect(folder: Path) -> bool:
        found = find_training_checkpoint(folder)
        return found is not None and found.kind == kind

    return detect


def _register() -> None:
    from reshard.formats.registry import Reader, register
    from reshard.formats.unpickle import DCP_METADATA_GLOBALS, DEEPSPEED_GLOBALS

    register(
        Reader(
            "deepspeed",
            _loader("deepspeed"),
            _detects("deepspeed"),
            options=frozenset({"tag", "config"}),
            pickle_globals=DEEPSPEED_GLOBALS,
        )
    )
    register(
        Reader(
            "dcp",
            _loader("dcp"),
            _detects("dcp"),
            options=frozenset({"config"}),
            pickle_globals=DCP_METADATA_GLOBALS,
        )
    )
    register(
        Reader(
            "dcp-safetensors",
            _loader("dcp-safetensors"),
            _detects("dcp-safetensors"),
            options=frozenset({"config"}),
        )
    )


_register()
