"""The header reader and writer against the reference safetensors library, byte for byte."""

import json
import struct

import numpy as np
import pytest
from conftest import write_safetensors
from safetensors import safe_open
from safetensors.numpy import load_file

from reshard.errors import FormatError
from reshard.formats.safetensors import build_header, read_header


def test_golden_header_bytes():
    header = build_header({"format": "pt"}, [("b", "F32", (2,), 8), ("a", "I64", (), 8)], pad_to=8)
    body = (
        b'{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"I64","shape":[],"data_offsets":[8,16]}}'
    )
    padding = b" " * (-(8 + len(body)) % 8)
    assert header == struct.pack("<Q", len(body) + len(padding)) + body + padding
    assert len(header) % 8 == 0


def test_header_page_offset_padding_is_still_valid(tmp_path):
    entries = [("w", "F32", (3,), 12)]
    header = build_header({"format": "pt"}, entries, first_data_page_offset=4088)
    assert len(header) % 4096 == 4088
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + np.arange(3, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(load_file(path)["w"], np.arange(3, dtype=np.float32))
    assert read_header(path).tensors[0].offset == len(header)


def test_reads_what_the_reference_writer_wrote(tmp_path):
    tensors = {
        "w": np.ones((3, 5), np.float32),
        "ids": np.arange(7, dtype=np.int64),
        "s": np.array(2.5, dtype=np.float16),
        "e": np.zeros((0, 4), np.float32),
    }
    path = write_safetensors(tmp_path / "r.safetensors", tensors, {"format": "pt", "k": "v"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "k": "v"}
    got = {t.name: (t.dtype, t.shape, t.nbytes) for t in header.tensors}
    assert got == {
        "w": ("F32", (3, 5), 60),
        "ids": ("I64", (7,), 56),
        "s": ("F16", (), 2),
        "e": ("F32", (0, 4), 0),
    }
    raw = path.read_bytes()
    for t in header.tensors:
        np.testing.assert_array_equal(
            np.frombuffer(raw[t.offset : t.offset + t.nbytes], dtype=tensors[t.name].dtype).reshape(
                tensors[t.name].shape
            ),
            tensors[t.name],
        )


def _file(tmp_path, header: dict, data: bytes = b"", raw_header: bytes | None = None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "inconsistent"),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "belong to no tensor"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "trailing bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2, "truncated"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"", "shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"", "data_offsets"),
        ({"__metadata__": {"n": 1}}, b"", "__metadata__"),
        ({"w": [1, 2]}, b"", "entry must be an object"),
    ],
)
def test_bad_headers_name_the_file_and_tensor(tmp_path, header, data, message):
    path = _file(tmp_path, header, data)
    with pytest.raises(FormatError) as e:
        read_header(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_header_that_is_not_json(tmp_path):
    with pytest.raises(FormatError, match="not valid JSON"):
        read_header(_file(tmp_path, {}, raw_header=b"{not json"))


def test_header_length_past_end_of_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(FormatError, match="past the end of the file"):
        read_header(path)


def test_huge_header_claim_fails_before_allocating(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="100 MB"):
        read_header(path)


def test_terabyte_tensor_claim_in_tiny_file_fails_fast(tmp_path):
    path = _file(tmp_path, {"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}})
    with pytest.raises(FormatError, match="truncated"):
        read_header(path)


def test_file_shorter_than_prefix(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="truncated"):
        read_header(path)


def test_reference_reader_agrees_with_our_written_headers(tmp_path):
    entries = [("a", "BF16", (4, 4), 32), ("b", "U8", (3,), 3), ("c", "BOOL", (1,), 1)]
    path = tmp_path / "ours.safetensors"
    path.write_bytes(build_header({"format": "pt"}, entries) + bytes(36))
    with safe_open(path, "np") as f:
        assert sorted(f.keys()) == ["a", "b", "c"]
        assert f.metadata() == {"format": "pt"}
