"""numpy's float32 -> bfloat16 cast and Q8_0 quantizer give the bytes of torch's kernels
and of ggml's reference, and a job that uses them never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from reshard.quant.ggml import Workspace
from reshard.quant.ggml import quantize_q8_0 as torch_q8_0
from reshard.quant.ggml_numpy import NumpyWorkspace
from reshard.quant.ggml_numpy import quantize_q8_0 as numpy_q8_0
from reshard.transfer.bf16 import bf16_to_f32, f32_to_bf16
from reshard.transfer.cast import KERNELS_ENV, kernels, kernels_for
from tests.conftest import run_cli, tree_checksums
from tests.quant_models import make_tiny_llama
from tests.test_quant_golden import cases


def float32_samples() -> np.ndarray:
    """Every sign and exponent with random mantissas, the neighbours of every rounding tie
    of the 16 bits kept, and the special values: zeros, subnormals, infinities, NaNs
    (quiet, signalling, negative)."""
    rng = np.random.default_rng(3)
    sign = np.repeat(np.array([0, 1 << 31], np.uint32), 256 * 512)
    exponent = np.tile(np.repeat(np.arange(256, dtype=np.uint32) << 23, 512), 2)
    mantissa = rng.integers(0, 1 << 23, sign.shape[0], dtype=np.uint32)
    ties = (rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16) | 0x8000
    special = np.array(
        [0, 1 << 31, 1, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF],
        np.uint32,
    )
    return np.concatenate([sign | exponent | mantissa, ties - 1, ties, ties + 1, special])


def test_bf16_cast_is_torchs_bit_for_bit():
    bits = float32_samples()
    want = torch.from_numpy(bits.view(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    got = f32_to_bf16(bits, np.empty(bits.shape, np.uint16), np.empty(bits.shape, np.uint32))
    assert np.isnan(bits.view(np.float32)).sum() > 1000  # the samples hold many NaNs
    assert np.array_equal(got, want.view(np.uint16))


def test_bf16_back_to_float32_is_exact():
    bits = float32_samples()
    b = torch.from_numpy(bits.view(np.float32)).to(torch.bfloat16)
    got = bf16_to_f32(b.view(torch.int16).numpy().view(np.uint16), np.empty(bits.shape, np.float32))
    assert np.array_equal(got.view(np.uint32), b.float().numpy().view(np.uint32))


@pytest.mark.parametrize("name", list(cases()))
def test_q8_0_is_ggmls_and_torchs_bit_for_bit(name):
    x = cases()[name]
    got = numpy_q8_0(x, NumpyWorkspace())
    assert np.array_equal(got, quantize(x, GGMLQuantizationType.Q8_0))
    assert np.array_equal(got, torch_q8_0(torch.from_numpy(x), Workspace()).numpy())


def test_q8_0_of_bfloat16_and_extreme_scales_is_torchs():
    """bfloat16 sources go through bf16_to_f32 first; huge, tiny and infinite values
    overflow in numpy exactly as in the torch kernel."""
    rng = np.random.default_rng(5)
    scale = rng.choice(np.array([1e-30, 1e-6, 1.0, 1e4, 3e38 / 128], np.float32), 64 * 1024)
    x = (rng.standard_normal(64 * 1024).astype(np.float32) * scale).astype(np.float32)
    x[:32] = 0
    x[32:64] = np.float32(1e-42)
    x[64] = np.inf
    ws = NumpyWorkspace()
    assert np.array_equal(
        numpy_q8_0(x.reshape(16, -1), ws), torch_q8_0(torch.from_numpy(x).view(16, -1)).numpy()
    )
    xb = torch.from_numpy(x).to(torch.bfloat16)
    wide = bf16_to_f32(xb.view(torch.int16).numpy().view(np.uint16), np.empty(x.shape, np.float32))
    assert np.array_equal(numpy_q8_0(wide.reshape(16, -1), ws), torch_q8_0(xb.view(16, -1)).numpy())


def test_the_choice_follows_the_size_and_the_override(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    with kernels_for(casts=10**6, quantized=10**6):
        assert kernels() == "numpy"
    with kernels_for(casts=10**13):
        assert kernels() == "torch"
    monkeypatch.setenv(KERNELS_ENV, "torch")
    with kernels_for(casts=10):
        assert kernels() == "torch"
    assert kernels() == "numpy"  # restored after the block


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved in float32 by transformers, with a tokenizer (GGUF needs one)."""
    return make_tiny_llama(tmp_path_factory.mktemp("numpy-kernels") / "tiny")


@pytest.fixture(scope="module")
def llama_bf16_dir(tmp_path_factory):
    """The same in bfloat16: Q8_0 reads it through bf16_to_f32, and GGUF's float32 norms
    are a bfloat16 -> float32 cast."""
    return make_tiny_llama(tmp_path_factory.mktemp("numpy-kernels-bf16") / "tiny", dtype="bfloat16")


def _split_importtime(src, out, kernels_choice: str, *args: str) -> set[str]:
    """Run the CLI under ``-X importtime``; returns the top-level packages it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reshard.cli", "split", str(src), "-o", str(out), *args],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, KERNELS_ENV: kernels_choice},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    ]
    return {name.split(".")[0] for name in lines}


@pytest.mark.parametrize(
    "source, args",
    [
        ("llama_dir", ("--dtype", "bf16")),
        ("llama_dir", ("--quantize", "q8_0")),
        ("llama_bf16_dir", ("--quantize", "q8_0")),
        ("llama_bf16_dir", ("--dtype", "f32")),
    ],
    ids=["f32-bf16", "f32-q8_0", "bf16-q8_0", "bf16-f32"],
)
def test_a_split_with_numpys_kernels_writes_torchs_bytes_without_torch(request, tmp_path, source, args):
    llama_dir = request.getfixturevalue(source)
    with_numpy = _split_importtime(llama_dir, tmp_path / "numpy", "numpy", *args, "--workers", "2")
    with_torch = _split_importtime(llama_dir, tmp_path / "torch", "torch", *args, "--workers", "2")
    assert "torch" not in with_numpy and "numpy" in with_numpy
    assert "torch" in with_torch
    assert tree_checksums(tmp_path / "numpy") == tree_checksums(tmp_path / "torch")
    auto = run_cli("split", str(llama_dir), "-o", str(tmp_path / "auto"), *args, "--json")  # small: numpy
    assert auto.returncode == 0, auto.stderr
    assert tree_checksums(tmp_path / "auto") == tree_checksums(tmp_path / "numpy")
    assert json.loads(auto.stdout)["ok"]


def test_an_unknown_kernel_setting_is_one_line(llama_dir, tmp_path):
    proc = run_cli(
        "split", str(llama_dir), "-o", str(tmp_path / "o"), "--dtype", "bf16", env={KERNELS_ENV: "cuda"}
    )
    assert proc.returncode != 0
    assert "RESHARD_KERNELS='cuda': use auto, numpy or torch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
