"""The split's quantize/cast path (compute threads that read, convert and ``pwrite`` their
own bands) writes the same bytes as the sequential iterator, whatever the thread count."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from reshard.quant.fp8 import quantize_fp8_block
from reshard.quant.ggml import quantize_q8_0
from reshard.tensors import TensorInfo
from reshard.transfer.cast import compute_threads, iter_tensor_bytes, write_computed
from reshard.transfer.sources import SourceReader
from reshard.writers.fp8 import fp8_tensors
from reshard.writers.gguf import gguf_tensor, permuted_extents

ROWS, COLS = 512, 1024  # several bands each (256 K elements per band)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One bf16 matrix at an odd offset of a raw file, and its values."""
    path = tmp_path_factory.mktemp("stream") / "w.bin"
    w = (torch.randn(ROWS, COLS) * 0.05).to(torch.bfloat16)
    path.write_bytes(b"x" * 24 + w.view(torch.uint8).numpy().tobytes())
    return path, w


def _written(info: TensorInfo, folder, threads: int) -> bytes:
    out = folder / f"out-{threads}"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    advanced = []
    try:
        with SourceReader() as reader, compute_threads(threads):
            assert write_computed(info, reader, fd, 8, advanced.append)
    finally:
        os.close(fd)
    data = out.read_bytes()
    assert data[:8] == b"\0" * 8 and sum(advanced) == info.nbytes == len(data) - 8
    return data[8:]


def _tensors(path) -> dict[str, TensorInfo]:
    t = TensorInfo.from_file(
        "model.layers.0.self_attn.q_proj.weight", "BF16", (ROWS, COLS), path, 24, ROWS * COLS * 2
    )
    q8 = gguf_tensor(t, "blk.0.attn_q.weight", "Q8_0")
    weight, scale = fp8_tensors(t)
    return {
        "q8_0": q8,
        "q8_0 permuted": replace(q8, extents=permuted_extents(t, 8)),
        "fp8": weight,
        "fp8 scales": scale,
        "bf16 -> f32": t.converted_to("F32"),
    }


@pytest.mark.parametrize("name", ["q8_0", "q8_0 permuted", "fp8", "fp8 scales", "bf16 -> f32"])
def test_compute_threads_write_the_iterators_bytes(source, tmp_path, name):
    path, _ = source
    info = _tensors(path)[name]
    with SourceReader() as reader:
        want = b"".join(bytes(c) for c in iter_tensor_bytes(info, reader, 1 << 16))
    for threads in (1, 3):
        assert _written(info, tmp_path, threads) == want


def test_the_bytes_are_the_kernels_on_the_whole_tensor(source, tmp_path):
    path, w = source
    tensors = _tensors(path)
    assert _written(tensors["q8_0"], tmp_path, 2) == quantize_q8_0(w.float()).numpy().tobytes()
    q, s = quantize_fp8_block(w.float())
    assert _written(tensors["fp8"], tmp_path, 2) == q.view(torch.uint8).numpy().tobytes()
    assert _written(tensors["fp8 scales"], tmp_path, 2) == s.numpy().tobytes()


def test_the_permutation_reaches_the_compute_threads(source, tmp_path):
    path, _ = source
    tensors = _tensors(path)
    assert _written(tensors["q8_0 permuted"], tmp_path, 2) != _written(tensors["q8_0"], tmp_path, 2)
