"""Property tests for every reader that takes untrusted bytes: random and mutated
safetensors headers, index files, whole checkpoint folders, torch.save zip/legacy files and
raw pickles. The properties: only ``ReshardError`` escapes, nothing hangs (SIGALRM per
case), and nothing allocates in proportion to a number in the input (tracemalloc peak per
case stays small even when a header claims a terabyte).

``bench/fuzz.py`` (``make fuzz``) runs the same ``TARGETS`` for 100,000+ cases each.
"""

from __future__ import annotations

import gc
import io
import json
import pickle
import signal
import struct
import time
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reshard.errors import ReshardError
from reshard.formats.index import read_index
from reshard.formats.registry import load_checkpoint
from reshard.formats.safetensors import build_header, parse_header, read_header
from reshard.hub.resolve import resolve_local
from reshard.units import DTYPE_SIZES, dtype_nbytes

CASE_SECONDS = 10  # a case slower than this is a hang
PEAK_BYTES = 16 * 1024 * 1024  # per case; inputs are at most a few KB
# bench/fuzz.py turns per-case tracing off (it costs ~2x) and checks peak RSS instead.
TRACE_MEMORY = True

# ------------------------------------------------------------------------------ inputs

INTERESTING_INTS = [
    0,
    1,
    7,
    8,
    255,
    4096,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53,
    2**63 - 1,
    2**63,
    2**64 - 1,
    10**12,
    10**18,
    99_999_999,
    100_000_001,
]
DTYPES = sorted(DTYPE_SIZES) + ["F128", "", "f32", "BF16 "]


def safetensors_seed(n_tensors: int, salt: int) -> bytes:
    """A valid little safetensors file (the same layout reshard writes)."""
    entries, data = [], b""
    dtypes = ["F32", "BF16", "I64", "U8", "F4", "BOOL"]
    for i in range(n_tensors):
        dtype = dtypes[(i + salt) % len(dtypes)]
        shape = (2, i + 1) if dtype != "F4" else (3,)
        nbytes = dtype_nbytes(dtype, shape)
        entries.append((f"model.layers.{i}.w", dtype, shape, nbytes))
        data += bytes((salt + j) % 251 for j in range(nbytes))
    return build_header({"format": "pt"}, entries, pad_to=8) + data


SAFETENSORS_SEEDS = [safetensors_seed(n, s) for n, s in ((1, 0), (3, 1), (6, 2), (0, 3))]
INDEX_SEED = json.dumps(
    {
        "metadata": {"total_size": 24},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
).encode()

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate", "int64", "int32", "splice", "digit"]),
        st.integers(0, 1 << 16),
        st.binary(max_size=12),
        st.sampled_from(INTERESTING_INTS),
    ),
    max_size=4,
)


def mutate(data: bytes, ops: list, others: list[bytes] = ()) -> bytes:
    """Apply byte-level mutations (AFL style) at positions taken modulo the length."""
    buf = bytearray(data)
    for kind, pos, blob, number in ops:
        at = pos % (len(buf) + 1)
        if kind == "flip" and buf:
            buf[at % len(buf)] ^= 1 << (pos % 8)
        elif kind == "insert":
            buf[at:at] = blob
        elif kind == "delete":
            del buf[at : at + 1 + pos % 64]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "int64":
            buf[at : at + 8] = struct.pack("<Q", number)
        elif kind == "int32":
            buf[at : at + 4] = struct.pack("<I", number % 2**32)
        elif kind == "splice" and others:
            other = others[pos % len(others)]
            buf[at:] = other[at % (len(other) + 1) :]
        elif kind == "digit":
            # Replace a number in JSON text with an interesting one (headers are JSON).
            text = bytes(buf)
            digits = [i for i, c in enumerate(text) if 48 <= c <= 57]
            if digits:
                i = digits[pos % len(digits)]
                j = i
                while j < len(text) and 48 <= text[j] <= 57:
                    j += 1
                buf[i:j] = str(number).encode()
    return bytes(buf)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from(INTERESTING_INTS)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
shapes = st.lists(st.sampled_from(INTERESTING_INTS) | st.integers(-2, 64), max_size=6)
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPES) | json_scalars,
        "shape": shapes | json_values,
        "data_offsets": st.lists(
            st.sampled_from(INTERESTING_INTS) | st.integers(0, 512), min_size=0, max_size=3
        )
        | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=10), tensor_entries | json_values, max_size=6).flatmap(
    lambda d: st.just(d)
    | st.builds(
        lambda m: {"__metadata__": m, **d},
        st.dictionaries(st.text(max_size=6), st.text(max_size=6) | json_scalars, max_size=3),
    )
)


# -------------------------------------------------------------------------- the oracle


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case. A BaseException, so that a reader's own broad
    ``except Exception`` (which turns surprises into FormatError) cannot hide a hang."""


@contextmanager
def guarded(name: str, max_seconds: int = CASE_SECONDS, peak: int = PEAK_BYTES):
    """Run one case: ReshardError is a pass, a hang or a big allocation is a failure."""

    def timeout(signum, frame):
        raise CaseTimeout(f"{name}: one case ran over {max_seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    used = 0
    # The cyclic GC stays off inside the case: a collection of hypothesis' own heap is
    # not the reader's time, and an alarm landing in a GC callback would be swallowed.
    gc.disable()
    if TRACE_MEMORY:
        tracemalloc.start()
    cpu = time.process_time()
    signal.alarm(max_seconds)
    try:
        yield
    except ReshardError:
        pass
    finally:
        signal.alarm(0)
        cpu = time.process_time() - cpu
        if TRACE_MEMORY:
            _, used = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        gc.enable()
        signal.signal(signal.SIGALRM, old)
    # Backs up the alarm (CPU time, so a busy machine cannot fail it): a hang detector.
    assert cpu < max_seconds, f"{name}: one case used {cpu:.1f} s of CPU"
    assert used < peak, f"{name}: one case allocated {used} bytes"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------ targets
# Each target takes (scratch folder, hypothesis data) and drives one reader.


def target_safetensors_bytes(scratch: Path, data) -> None:
    """Mutated safetensors files, and wholly random bytes, through read_header."""
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=256))
    else:
        seed = data.draw(st.sampled_from(SAFETENSORS_SEEDS))
        raw = mutate(seed, data.draw(MUTATIONS), SAFETENSORS_SEEDS)
    path = write(scratch / "fuzz.safetensors", raw)
    with guarded("read_header"):
        read_header(path)


def target_safetensors_header(scratch: Path, data) -> None:
    """Structurally random header JSON (huge shapes and offsets) through parse_header and,
    framed as a file with a little data, through read_header."""
    header = data.draw(headers)
    body = json.dumps(header).encode()
    tail = data.draw(st.integers(0, 1024))
    claimed_size = data.draw(st.none() | st.integers(0, 2**64))
    with guarded("parse_header"):
        parse_header(Path("h.safetensors"), body, claimed_size)
    path = write(scratch / "h.safetensors", struct.pack("<Q", len(body)) + body + b"\0" * tail)
    with guarded("read_header(file)"):
        read_header(path)


def target_index(scratch: Path, data) -> None:
    """Random JSON, random weight maps and mutated index bytes through read_index."""
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        raw = json.dumps(data.draw(json_values)).encode()
    elif choice == 1:
        names = st.text(max_size=12) | st.sampled_from(
            ["../x", "/etc/passwd", "a/b", "C:x", "\0", "a\\b", "..", ".", ""]
        )
        weight_map = data.draw(st.dictionaries(st.text(max_size=8), names | json_scalars, max_size=5))
        raw = json.dumps({"metadata": data.draw(json_values), "weight_map": weight_map}).encode()
    else:
        raw = mutate(INDEX_SEED, data.draw(MUTATIONS), [INDEX_SEED])
    path = write(scratch / "model.safetensors.index.json", raw)
    with guarded("read_index"):
        read_index(path)


def target_folder(scratch: Path, data) -> None:
    """A two-shard checkpoint folder with one mutated file, loaded as reshard loads sources."""
    folder = scratch / "ckpt"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    files = {
        "model-00001-of-00002.safetensors": SAFETENSORS_SEEDS[1],
        "model-00002-of-00002.safetensors": safetensors_seed(2, 5),
    }
    names = {}
    for file_name, raw in files.items():
        names.update(
            dict.fromkeys(
                (
                    t.name
                    for t in parse_header(
                        Path(file_name), raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]], None
                    ).tensors
                ),
                file_name,
            )
        )
    files = {k: v.replace(b"model.layers", b"a" if "1-of" in k else b"b") for k, v in files.items()}
    weight_map = {k.replace("model.layers", "a" if "1-of" in v else "b"): v for k, v in names.items()}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}
    ).encode()
    victim = data.draw(st.sampled_from(sorted(files)))
    files[victim] = mutate(files[victim], data.draw(MUTATIONS), list(files.values()))
    for file_name, raw in files.items():
        write(folder / file_name, raw)
    with guarded("load folder"):
        load_checkpoint(resolve_local(folder))


_BIN_SEEDS: list[bytes] = []


def bin_seeds() -> list[bytes]:
    """torch.save files: zip and legacy, flat and nested, with a strided view (made once)."""
    if not _BIN_SEEDS:
        import torch

        g = torch.Generator().manual_seed(0)
        sd = {
            "w": torch.randn(3, 4, generator=g),
            "b": torch.zeros(2, dtype=torch.bfloat16),
            "t": torch.arange(6).view(2, 3).t(),
            "s": torch.tensor(1.5),
        }
        sd["tied"] = sd["w"]
        for obj in (sd, {"model": sd, "step": 3, "opt": {"lr": 0.1}}):
            for zipped in (True, False):
                buf = io.BytesIO()
                torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
                _BIN_SEEDS.append(buf.getvalue())
    return _BIN_SEEDS


def target_bin(scratch: Path, data) -> None:
    """Mutated torch.save files (zip and legacy) through the .bin reader."""
    from reshard.formats.torchbin import read_bin_file

    seeds = bin_seeds()
    raw = mutate(data.draw(st.sampled_from(seeds)), data.draw(MUTATIONS), seeds)
    path = write(scratch / "fuzz.bin", raw)
    key = data.draw(st.none() | st.just("model"))
    with guarded("read_bin_file"):
        read_bin_file(path, key=key)


def _pickle_seeds() -> list[bytes]:
    out = [
        pickle.dumps({"a": [1, 2.5, "x", (1, 2)], "b": {"c": None, "d": b"xy"}}, protocol=p)
        for p in (0, 2, 4)
    ]
    for raw in bin_seeds():
        if raw.startswith(b"PK"):
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                out += [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    return out


def target_pickle(scratch: Path, data) -> None:
    """Mutated pickles (torch's data.pkl and plain ones) and random bytes through the
    allow-list interpreter."""
    from reshard.formats.unpickle import Reader, run_pickle

    seeds = _pickle_seeds()
    if data.draw(st.integers(0, 4)) == 0:
        raw = data.draw(st.binary(max_size=128))
    else:
        raw = mutate(data.draw(st.sampled_from(seeds)), data.draw(MUTATIONS), seeds)
    with guarded("run_pickle"):
        run_pickle(Reader(raw), lambda pid: pid)


TARGETS = {
    "safetensors_bytes": target_safetensors_bytes,
    "safetensors_header": target_safetensors_header,
    "index": target_index,
    "folder": target_folder,
    "bin": target_bin,
    "pickle": target_pickle,
}

# ------------------------------------------------------------------------- the tests

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(tmp_path_factory, data):
    target_safetensors_bytes(_scratch(tmp_path_factory), data)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path_factory, data):
    target_safetensors_header(_scratch(tmp_path_factory), data)


@FUZZ
@given(data=st.data())
def test_fuzz_index(tmp_path_factory, data):
    target_index(_scratch(tmp_path_factory), data)


@FUZZ
@given(data=st.data())
def test_fuzz_folder(tmp_path_factory, data):
    target_folder(_scratch(tmp_path_factory), data)


@FUZZ
@given(data=st.data())
def test_fuzz_bin(tmp_path_factory, data):
    target_bin(_scratch(tmp_path_factory), data)


@FUZZ
@given(data=st.data())
def test_fuzz_pickle(tmp_path_factory, data):
    target_pickle(_scratch(tmp_path_factory), data)


_SCRATCH: dict[int, Path] = {}


def _scratch(factory) -> Path:
    key = id(factory)
    if key not in _SCRATCH:
        _SCRATCH[key] = factory.mktemp("fuzz")
    return _SCRATCH[key]


# ------------------------------------------------------ huge claims in tiny files fail fast


def _claims() -> dict[str, bytes]:
    tb = 10**12

    def st_file(header: dict, data: bytes = b"\0" * 1000) -> bytes:
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + data

    return {
        "1 TB tensor": st_file({"w": {"dtype": "U8", "shape": [tb], "data_offsets": [0, tb]}}),
        "header length 99 MB": struct.pack("<Q", 99_000_000) + b"{}" + b" " * 1000,
        "header length 2^64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
        "shape of 20000 huge dims": st_file(
            {"w": {"dtype": "F32", "shape": [2**60] * 20000, "data_offsets": [0, 4]}}
        ),
        "shape product 1e36": st_file(
            {"w": {"dtype": "F64", "shape": [10**18, 10**18], "data_offsets": [0, 8]}}
        ),
        "5000-digit number": (lambda b: struct.pack("<Q", len(b)) + b)(
            b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
        ),
    }


def test_huge_claims_fail_fast_without_allocating(tmp_path):
    for what, raw in _claims().items():
        path = write(tmp_path / "claim.safetensors", raw)
        with guarded(what, max_seconds=5, peak=2 * len(raw) + 1_000_000):
            read_header(path)
            raise AssertionError(f"{what}: accepted")
        try:
            read_header(path)
        except ReshardError as e:  # one short line naming the file, not a 20000-number dump
            assert str(path) in str(e) and len(str(e)) < 400, (what, str(e)[:500])


def test_bin_zip_entry_offset_past_2_63_is_a_format_error(tmp_path):
    # Found by `make fuzz` (bin, seed 2002): a central directory whose zip64 field claims a
    # local header offset past 2**63 made file.seek raise a bare ValueError.
    seed = bin_seeds()[2]
    raw = mutate(seed, [("int32", 27035, b"\xc9}", 10**18)], bin_seeds())
    path = write(tmp_path / "bad.bin", raw)
    from reshard.errors import FormatError
    from reshard.formats.torchbin import read_bin_file

    try:
        read_bin_file(path)
    except FormatError as e:
        assert "outside the file" in str(e) and str(path) in str(e)
    else:
        raise AssertionError("a damaged zip was accepted")
