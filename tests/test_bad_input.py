"""Every bad input of issue 2 gets one clear line naming the file or tensor, a non-zero
exit, and no output (nor temporary) folder afterwards. Run as real subprocesses."""

import json
import struct

import pytest
from conftest import random_tensors, run_cli, write_safetensors


def _raw(path, header: dict | bytes, data: bytes):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _good(folder, name="model.safetensors", seed=0, names=("a", "b")):
    folder.mkdir(exist_ok=True)
    return write_safetensors(folder / name, random_tensors(seed, {n: ((4, 4), "float32") for n in names}))


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def make_truncated(src):
    path = _good(src)
    path.write_bytes(path.read_bytes()[:-10])
    return "truncated", path.name


def make_header_past_end(src):
    src.mkdir()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 999) + b"{}")
    return "past the end of the file", "model.safetensors"


def make_not_json(src):
    src.mkdir()
    _raw(src / "model.safetensors", b"{this is not json}", b"")
    return "not valid JSON", "model.safetensors"


def make_overlap(src):
    src.mkdir()
    _raw(
        src / "model.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    )
    return "overlaps", "'b'"


def make_gap(src):
    src.mkdir()
    _raw(src / "model.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    return "belong to no tensor", "'a'"


def make_unknown_dtype(src):
    src.mkdir()
    _raw(src / "model.safetensors", {"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    return "unknown dtype 'Q4_K'", "'a'"


def make_shape_mismatch(src):
    src.mkdir()
    _raw(src / "model.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    return "x F32 is 12 bytes but data_offsets span 8", "'a'"


def make_index_missing_file(src):
    _good(src, "model-00001-of-00002.safetensors")
    _index(
        src,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    )
    return "model-00002-of-00002.safetensors, which is missing", "model.safetensors.index.json"


def make_index_tensor_missing(src):
    _good(src, "model-00001-of-00001.safetensors")
    _index(
        src,
        {
            "a": "model-00001-of-00001.safetensors",
            "b": "model-00001-of-00001.safetensors",
            "zzz": "model-00001-of-00001.safetensors",
        },
    )
    return "names tensor 'zzz'", "but that file lacks it"


def make_duplicate_tensor(src):
    _good(src, "one.safetensors", 0, ("a", "b"))
    _good(src, "two.safetensors", 1, ("b", "c"))
    return "tensor 'b' is in both", "two.safetensors"


def make_empty(src):
    src.mkdir()
    write_safetensors(src / "model.safetensors", {})
    return "holds no tensors", "model.safetensors"


def make_index_dotdot(src):
    _good(src, "model-00001-of-00001.safetensors")
    (src.parent / "evil.safetensors").write_bytes((src / "model-00001-of-00001.safetensors").read_bytes())
    _index(src, {"a": "../evil.safetensors"})
    return "'../evil.safetensors' must be a plain name", "model.safetensors.index.json"


def make_index_absolute(src):
    path = _good(src, "model-00001-of-00001.safetensors")
    _index(src, {"a": str(path)})
    return "must be a plain name", "no absolute path"


def make_no_weights(src):
    src.mkdir()
    (src / "config.json").write_text("{}")
    return "no *.safetensors or *.bin weights", "src"


CASES = [
    make_truncated,
    make_header_past_end,
    make_not_json,
    make_overlap,
    make_gap,
    make_unknown_dtype,
    make_shape_mismatch,
    make_index_missing_file,
    make_index_tensor_missing,
    make_duplicate_tensor,
    make_empty,
    make_index_dotdot,
    make_index_absolute,
    make_no_weights,
]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_one_line_nonzero_no_output(tmp_path, make):
    src = tmp_path / "src"
    expected, names = make(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    proc = run_cli("split", str(src), "-o", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0] and names in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder either


def test_unknown_repo_id_offline(tmp_path):
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("split", "nobody/no-such-model", "-o", str(out), env=env)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.startswith("error: no such file or folder 'nobody/no-such-model'") and "\n" not in line
    assert "HF_HUB_OFFLINE" in line
    assert not out.exists()


def test_missing_local_path(tmp_path):
    proc = run_cli("split", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "no such file or folder" in proc.stderr and not (tmp_path / "out").exists()


def test_debug_env_shows_traceback(tmp_path):
    src = tmp_path / "src"
    make_not_json(src)
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "reshard.cli", "split", str(src), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "RESHARD_DEBUG": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FormatError" in proc.stderr


def test_same_bad_inputs_fail_inspect_and_verify_cleanly(tmp_path):
    src = tmp_path / "src"
    make_overlap(src)
    for args in (["inspect", str(src)], ["verify", str(src)]):
        proc = run_cli(*args)
        assert proc.returncode == 1 and "overlaps" in proc.stderr and "Traceback" not in proc.stderr
