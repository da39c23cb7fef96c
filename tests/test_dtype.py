"""--dtype: converted values equal torch's Tensor.to bit for bit, in any chunking; integer
and bool tensors are untouched; shards are sized by converted bytes; config.json records
the new dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_json, run_cli

from reshard.formats.safetensors import read_header
from reshard.transfer.cast import iter_tensor_bytes

torch = pytest.importorskip("torch")


def awkward_values(n: int, seed: int):
    """Normal values across a wide range plus every special case a cast must round right:
    NaN (both signs), +-inf, -0.0, fp32 subnormals, values past fp16's range, and exact
    round-to-nearest-even ties for bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x[::7] = float("nan")
    x[1::11] = float("inf")
    x[2::13] = -float("inf")
    x[3::17] = 1e-42
    x[4::19] = -0.0
    x[5::23] = 7e4
    x[8::31] = (
        torch.randint(0, 2**16, (x[8::31].numel(),), generator=g, dtype=torch.int32)
        .mul(2**16)
        .add(2**15)
        .view(torch.float32)
    )  # exact bf16 ties
    x[9::37] = -float("nan")
    return x


def bits(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("dtype-src")
    x = awkward_values(300_001, 0)
    save_file(
        {
            "f32": x,
            "bf16": awkward_values(100_003, 1).to(torch.bfloat16),
            "f16": awkward_values(50_001, 2).to(torch.float16),
            "ids": torch.arange(1000, dtype=torch.int64),
            "mask": torch.arange(10) % 3 == 0,
        },
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "torch_dtype": "float32"}))
    return folder


@pytest.mark.parametrize("dtype,torch_name", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_split_dtype_is_bit_exact_against_tensor_to(tmp_path, mixed_source, dtype, torch_name):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    proc = run_cli("split", str(mixed_source), "-o", str(out), "--dtype", dtype, "--json")
    assert proc.returncode == 0, proc.stderr
    source = load_file(mixed_source / "model.safetensors")
    written = load_file(out / "model.safetensors")
    target = getattr(torch, torch_name)
    for name in ("f32", "bf16", "f16"):
        assert written[name].dtype == target
        assert bits(written[name]) == bits(source[name].to(target)), (name, dtype)
    assert torch.equal(written["ids"], source["ids"]) and written["ids"].dtype == torch.int64
    assert torch.equal(written["mask"], source["mask"]) and written["mask"].dtype == torch.bool
    config = read_json(out / "config.json")
    assert config["torch_dtype"] == torch_name and config["dtype"] == torch_name
    assert json.loads(proc.stdout)["total_size"] == sum(
        t.numel() * t.element_size() for t in written.values()
    )


@pytest.mark.parametrize("src,dst", [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32")])
@pytest.mark.parametrize("chunk", [4, 6, 4096 * 3 + 4, 1 << 20])
def test_chunks_never_split_elements(mixed_source, src, dst, chunk):
    name = {"F32": "f32", "BF16": "bf16"}[src]
    info = next(t for t in read_header(mixed_source / "model.safetensors").tensors if t.name == name)
    converted = info.converted_to(dst)
    from reshard.transfer.sources import SourceReader

    with SourceReader() as reader:
        chunks = [bytes(c) for c in iter_tensor_bytes(converted, reader, chunk)]
    from safetensors.torch import load_file

    want = bits(
        load_file(mixed_source / "model.safetensors")[name].to(
            {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dst]
        )
    )
    assert b"".join(chunks) == want
    out_size = {"BF16": 2, "F16": 2, "F32": 4}[dst]
    src_size = {"F32": 4, "BF16": 2}[src]
    assert all(len(c) % out_size == 0 for c in chunks)
    # Memory stays bounded by the chunk: no piece is bigger than the chunk's converted size.
    assert max(len(c) for c in chunks) <= max(chunk, src_size) // src_size * out_size


def test_shards_are_sized_by_converted_bytes(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {f"w{i}": torch.randn(1000) for i in range(8)}, src / "model.safetensors", metadata={"format": "pt"}
    )  # 8 x 4000 bytes of fp32
    proc = run_cli(
        "split", str(src), "-o", str(tmp_path / "out"), "--max-shard", "8000", "--dtype", "bf16", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["total_size"] == 8 * 2000
    assert [s["size"] for s in result["shards"]] == [8000, 8000]


def test_strided_bin_view_converts_bit_exact(tmp_path):
    """A transposed .bin view converted while streaming: strided gather + cast."""
    src = tmp_path / "src"
    src.mkdir()
    w = awkward_values(300 * 200, 3).reshape(300, 200)
    torch.save({"w": w.t(), "v": w[:, 5:150]}, src / "pytorch_model.bin")
    proc = run_cli("split", str(src), "-o", str(tmp_path / "out"), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    written = load_file(tmp_path / "out" / "model.safetensors")
    assert bits(written["w"]) == bits(w.t().to(torch.bfloat16))
    assert bits(written["v"]) == bits(w[:, 5:150].to(torch.bfloat16))
    verify = run_cli("verify", str(tmp_path / "out"), "--against", str(src))
    assert verify.returncode == 0, verify.stderr


def test_unknown_dtype_is_one_line(tmp_path, mixed_source):
    proc = run_cli("split", str(mixed_source), "-o", str(tmp_path / "out"), "--dtype", "int4")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "bf16" in proc.stderr
    assert not (tmp_path / "out").exists()
