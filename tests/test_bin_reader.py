"""The .bin reader on its own: every tensor kind torch.save writes, hostile pickles refused
with nothing executed, malformed files rejected with FormatError only."""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from reshard.errors import FormatError, UnsafePickleError
from reshard.formats.torchbin import read_bin, read_bin_file
from reshard.formats.unpickle import Reader, run_pickle

torch = pytest.importorskip("torch")


def tensor_bytes(t) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def output_bytes(info) -> bytes:
    from reshard.transfer.cast import iter_tensor_bytes
    from reshard.transfer.sources import SourceReader

    with SourceReader() as reader:
        return b"".join(bytes(c) for c in iter_tensor_bytes(info, reader, chunk=64))


def every_kind():
    base = torch.arange(6 * 10 * 8, dtype=torch.float32).reshape(6, 10, 8)
    return {
        "plain": torch.randn(5, 7),
        "param": torch.nn.Parameter(torch.randn(3)),
        "bf16": torch.randn(4, 4, dtype=torch.bfloat16),
        "f16": torch.randn(9, dtype=torch.float16),
        "i64": torch.arange(11),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "transposed": base[1].t(),
        "permuted": base.permute(2, 0, 1),
        "stepped": base[:, ::3, 1:7:2],
        "expanded": base[0, 0].expand(4, 8),
        "row_slice": base[2:4],
        "col_slice": base[:, :, 2:5],
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_tensor_kind_matches_torch_load(tmp_path, legacy):
    state = every_kind()
    if legacy:
        del state["f8"], state["u16"]  # torch's own legacy loader cannot read these back
    path = tmp_path / "sd.bin"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch.load(path, weights_only=True)
    infos = {t.name: t for t in read_bin_file(path)}
    assert set(infos) == set(state)
    for name, want in loaded.items():
        info = infos[name]
        assert info.shape == tuple(want.shape), name
        assert info.nbytes == want.numel() * want.element_size(), name
        assert output_bytes(info) == tensor_bytes(want), name
    assert infos["plain"].is_plain_copy and infos["row_slice"].is_plain_copy
    assert infos["transposed"].strides == (1, 8)
    assert infos["f16"].dtype == "F16" and infos["bool"].dtype == "BOOL"


def test_shared_storage_names_are_described_independently(tmp_path):
    w = torch.randn(4, 4)
    torch.save({"a": w, "b": w, "c": w[1:]}, tmp_path / "s.bin")
    part = read_bin(tmp_path / "s.bin")
    assert len(set(part.storage_of.values())) == 1
    infos = {t.name: t for t in part.tensors}
    assert infos["a"].offset == infos["b"].offset == infos["c"].offset - 16


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def hostile_zip(path: Path, payload: object, protocol: int) -> Path:
    """A torch.save-shaped zip whose data.pkl runs code when unpickled."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": payload}, protocol=protocol)
            dst.writestr(info, data)
    return path


@pytest.mark.parametrize("make,protocol", [(_System, 2), (_System, 4), (_Exec, 2)])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, make, protocol):
    marker = tmp_path / "marker"
    src = tmp_path / "model"
    src.mkdir()
    hostile_zip(src / "pytorch_model.bin", make(marker), protocol)
    with pytest.raises(UnsafePickleError, match="refuses global"):
        read_bin_file(src / "pytorch_model.bin")
    proc = run_cli("split", str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "pytorch_model.bin" in proc.stderr and "nothing was executed" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    inspect = run_cli("inspect", str(src))
    assert inspect.returncode == 1 and not marker.exists()


def test_hostile_plain_pickle_and_pickled_module_are_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_System(marker), protocol=2))
    with pytest.raises(UnsafePickleError):
        read_bin_file(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        read_bin_file(tmp_path / "module.pt")


def test_lengths_in_the_pickle_never_drive_allocation():
    # BINBYTES8 / BINUNICODE8 claiming 2^62 bytes, LONG4 claiming 2 GiB: refused at once.
    for payload in (
        b"\x80\x02\x8e" + struct.pack("<Q", 2**62),
        b"\x80\x02\x8d" + struct.pack("<Q", 2**62),
        b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1),
        b"\x80\x02\x96" + struct.pack("<Q", 2**40),
    ):
        with pytest.raises(FormatError, match="truncated|claims"):
            run_pickle(Reader(payload), lambda pid: pid)


def test_malformed_files_raise_format_error_only(tmp_path):
    path = tmp_path / "ok.bin"
    torch.save({"a": torch.randn(3, 5), "b": torch.randn(5, 3).t(), "c": torch.arange(4)}, path)
    good = path.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "bad.bin"
    outcomes = {"ok": 0, "format": 0}
    cases = [good[:n] for n in (0, 3, 10, 100, len(good) // 2, len(good) - 1)]
    for _ in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    cases += [b"\x80\x02" + bytes(rng.randrange(256) for _ in range(200)) for _ in range(50)]
    for data in cases:
        bad.write_bytes(data)
        try:
            read_bin_file(bad)
            outcomes["ok"] += 1
        except FormatError:
            outcomes["format"] += 1
    assert outcomes["format"] > 50  # the mutations really hit something


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.randn(64, 64)}, src / "pytorch_model.bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    proc = run_cli("split", str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "pytorch_model.bin" in proc.stderr and "re-download" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    # A tensor that claims more bytes than its storage holds.
    torch.save({"w": torch.randn(8)}, src / "pytorch_model.bin")
    with zipfile.ZipFile(src / "pytorch_model.bin") as z:
        names = z.namelist()
        entries = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    entries[pkl] = entries[pkl].replace(b"K\x08\x85", b"K\x40\x85", 1)
    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:
        for n in names:
            z.writestr(n, entries[n])
    with pytest.raises(FormatError, match="reaches past its storage"):
        read_bin_file(src / "pytorch_model.bin")

    (src / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(FormatError, match="not a PyTorch checkpoint"):
        read_bin_file(src / "pytorch_model.bin")


def test_compressed_storage_is_a_clear_error(tmp_path):
    path = tmp_path / "c.bin"
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(FormatError, match="compressed"):
        read_bin_file(path)


def test_huge_expanded_view_is_refused(tmp_path):
    """A shape is a number in the file: a stride-0 view claiming terabytes over a 16-byte
    storage is refused up front instead of being written."""
    torch.save({"e": torch.zeros(4).expand(2**20, 2**20, 4)}, tmp_path / "e.bin")
    with pytest.raises(FormatError, match="expanded view"):
        read_bin_file(tmp_path / "e.bin")


def test_pathological_pickles_end_quickly_with_format_error():
    """Work and objects are bounded whatever the bytes: 5M empty dicts, an unterminated
    GLOBAL line, an unbalanced stack, a memo reference that was never stored."""
    for payload in (
        b"\x80\x02" + b"}" * 5_000_000,
        b"\x80\x02c" + b"a" * 1_000_000,
        b"\x80\x02}}.",
        b"\x80\x02h\x05.",
        b"\x80\x02(((((.",
    ):
        with pytest.raises(FormatError):
            run_pickle(Reader(payload), lambda pid: pid)
