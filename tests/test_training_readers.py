"""The training-checkpoint readers against the stacks' own consolidation, on genuine
checkpoints written in this session by DeepSpeed and FSDP2 (tests/training_fixtures.py).

Every weight's extents, assembled byte by byte, must equal what DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` and torch's
``get_model_state_dict(full_state_dict=True)`` / ``dcp_to_torch_save`` give, and the
optimizer state must be reported with its exact size without being read.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from training_fixtures import CHECKPOINTS, reference_state_dict, training_checkpoints  # noqa: F401

from reshard.formats.training import find_training_checkpoint, load_training_checkpoint
from reshard.formats.training.layout import block_extents, clean_name

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def assemble(t) -> torch.Tensor:
    """A tensor's value from its extents, read row by row with plain file reads (an oracle
    independent of reshard's writer), cast as its dtype says."""
    stored = t.src_dtype or t.dtype
    itemsize = torch.empty((), dtype=TORCH_DTYPES[stored]).element_size()
    buf = bytearray(int(np.prod(t.shape, dtype=np.int64)) * itemsize)
    written = 0
    for e in t.extents:
        with open(e.source.path, "rb") as f:
            for k in range(e.rows):
                f.seek(e.offset + k * e.step_src)
                data = f.read(e.length)
                assert len(data) == e.length
                start = e.dest + k * e.step_dest
                buf[start : start + e.length] = data
                written += e.length
    assert written == len(buf), f"{t.name}: extents cover {written} of {len(buf)} bytes"
    value = (
        torch.frombuffer(buf, dtype=TORCH_DTYPES[stored]).reshape(t.shape)
        if buf
        else torch.empty(t.shape, dtype=TORCH_DTYPES[stored])
    )
    return value.to(TORCH_DTYPES[t.dtype])


def load(path: Path, **kw):
    source = find_training_checkpoint(path)
    assert source is not None, path
    return load_training_checkpoint(source, **kw)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_weights_equal_the_stacks_own_consolidation(training_checkpoints, name):
    root = training_checkpoints
    state = load(root / CHECKPOINTS[name])
    reference = reference_state_dict(root, name)
    ours = {t.name: t for t in state.tensors}
    # Every weight the stack consolidates is written, except the tied alias transformers
    # re-ties at load (the config says tie_word_embeddings); HuggingFaceStorageWriter
    # checkpoints were saved without it (safetensors refuses shared storage).
    expected = set(reference) - {"lm_head.weight"}
    assert set(ours) == expected
    if name != "hf-storage":
        assert set(state.dropped) == {"lm_head.weight"}
        assert "model.embed_tokens.weight" in state.dropped["lm_head.weight"]
    for tensor_name, t in ours.items():
        ref = reference[tensor_name]
        value = assemble(t)
        assert tuple(value.shape) == tuple(ref.shape), tensor_name
        if name.startswith("zero"):
            # The master weights' dtype (fp32); the frozen parameter has no master copy:
            # its own bf16, as zero_to_fp32 (and ZeRO-1's 16-bit module) has it.
            frozen = tensor_name == "model.layers.0.post_attention_layernorm.weight"
            assert t.dtype == ("BF16" if frozen else "F32"), tensor_name
        assert value.dtype == ref.dtype, tensor_name
        assert torch.equal(value, ref), tensor_name


def test_zero_uneven_partitions_and_padding_are_real(training_checkpoints):
    """The fixtures exercise what they claim: ZeRO-3 pads the last rank (33 elements ->
    17 + 16 + 1 padding) and a parameter spans both ranks' optimizer files."""
    state = load(training_checkpoints / CHECKPOINTS["zero3"])
    norm = next(t for t in state.tensors if t.name == "model.norm.weight")
    assert [e.length // 4 for e in norm.extents] == [17, 16]
    assert len({e.source.path for e in norm.extents}) == 2
    assert state.facts["ZeRO stage"] == 3 and state.facts["world size"] == 2
    assert state.facts["step"] == 2 and state.facts["tag"] == "global_step2"


def test_dcp_uneven_and_2d_blocks_are_real(training_checkpoints):
    fsdp = {t.name: t for t in load(training_checkpoints / CHECKPOINTS["fsdp2"]).tensors}
    rows = [e.length // (33 * 4) for e in fsdp["model.embed_tokens.weight"].extents]
    assert sorted(rows) == [50, 51]
    mesh = load(training_checkpoints / CHECKPOINTS["mesh2d"])
    assert mesh.facts["chunks per dim"] == "2 x 2" and mesh.facts["ranks"] == 4
    embed = next(t for t in mesh.tensors if t.name == "model.embed_tokens.weight")
    assert sorted((e.rows, e.length // 4) for e in embed.extents) == [(50, 16), (50, 17), (51, 16), (51, 17)]


def test_3d_blocks_cut_on_inner_dims(training_checkpoints):
    state = load(training_checkpoints / "mesh" / "mesh3d")
    reference = torch.load(training_checkpoints / "mesh" / "reference3d.pt", weights_only=True)
    assert {t.name for t in state.tensors} == set(reference)
    for t in state.tensors:
        assert torch.equal(assemble(t), reference[t.name]), t.name


def test_dcp_equals_torch_dcp_to_torch_save(training_checkpoints, tmp_path):
    """A second consolidation by torch itself: dcp_to_torch_save of the whole checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = training_checkpoints / CHECKPOINTS["fsdp2"]
    dcp_to_torch_save(str(folder), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    state = load(folder)
    assert {t.name for t in state.tensors} == set(full) - {"lm_head.weight"}
    for t in state.tensors:
        assert torch.equal(assemble(t), full[t.name]), t.name


def _zero_optimizer_bytes(folder: Path) -> tuple[int, int]:
    """Bytes and count of every tensor in the optimizer files except the master weights,
    by torch.load of the (trusted, test-made) files."""
    total = count = 0
    for path in sorted((folder / "global_step2").glob("*_optim_states.pt")):
        osd = torch.load(path, weights_only=False)["optimizer_state_dict"]
        master = {
            id(t) for key in ("fp32_flat_groups", "single_partition_of_fp32_groups") for t in osd.get(key, [])
        }
        stack = [osd]
        while stack:
            node = stack.pop()
            if isinstance(node, torch.Tensor):
                if id(node) not in master:
                    total += node.numel() * node.element_size()
                    count += 1
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, (list, tuple)):
                stack.extend(node)
    return total, count


@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_zero_optimizer_state_is_counted_exactly(training_checkpoints, name):
    folder = training_checkpoints / CHECKPOINTS[name]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    state = load(folder)
    assert state.skipped["optimizer state"] == _zero_optimizer_bytes(folder)
    # None of the extents points into the Adam moments: only master partitions are read.
    optim = {p for p in (folder / "global_step2").glob("*_optim_states.pt")}
    read = sum(e.nbytes for t in state.tensors for e in t.extents if e.source.path in optim)
    trainable = state.facts["trainable parameters"] * 4
    assert read == trainable


def test_dcp_optimizer_state_is_counted_exactly(training_checkpoints):
    folder = training_checkpoints / CHECKPOINTS["fsdp2"]
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # trusted: written by this session's generator
    expected = [0, 0]
    for fqn, m in meta.state_dict_metadata.items():
        if fqn.startswith("optim.") and hasattr(m, "size"):
            expected[0] += int(np.prod(m.size)) * m.properties.dtype.itemsize
            expected[1] += 1
        elif fqn.startswith("optim."):
            expected[0] += sum(v.length for k, v in meta.storage_data.items() if k.fqn == fqn)
            expected[1] += 1
    assert load(folder).skipped == {"optimizer state": tuple(expected)}


def test_names_lose_wrapper_prefixes():
    assert (
        clean_name("module._orig_mod.model.layers.0._fsdp_wrapped_module.mlp.down_proj.weight")
        == "model.layers.0.mlp.down_proj.weight"
    )
    assert clean_name("model.module.weight") == "model.module.weight"  # only a leading module.


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_block_extents_place_any_grid_of_blocks(tmp_path_factory, data):
    """Cut a random array (1-4 dims) into a random grid of blocks, store each block
    contiguously in a file, and rebuild the array from the extents."""
    rank = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    cuts = [
        sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=2))) - {n}) if n > 1 else []
        for n in shape
    ]
    bounds = [list(zip([0, *c], [*c, n])) for c, n in zip(cuts, shape)]
    path = tmp_path_factory.mktemp("blocks") / "blocks.bin"
    extents = []
    with open(path, "wb") as f:
        import itertools

        for box in itertools.product(*bounds):
            block = array[tuple(slice(a, b) for a, b in box)]
            f.write(b"\0" * 3)  # a block starts anywhere in its file
            extents += block_extents(
                path, f.tell(), 4, shape, tuple(a for a, _ in box), tuple(b - a for a, b in box)
            )
            f.write(np.ascontiguousarray(block).tobytes())
    out = bytearray(array.nbytes)
    raw = path.read_bytes()
    for e in extents:
        for k in range(e.rows):
            src, dst = e.offset + k * e.step_src, e.dest + k * e.step_dest
            out[dst : dst + e.length] = raw[src : src + e.length]
    assert bytes(out) == array.tobytes()
    assert sum(e.nbytes for e in extents) == array.nbytes


@pytest.mark.parametrize(
    "module",
    [
        "reshard.formats.training",
        "reshard.formats.training.layout",
        "reshard.formats.training.dcp",
        "reshard.formats.training.zero",
        "reshard.formats.unpickle",
    ],
)
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
