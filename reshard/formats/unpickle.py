"""A pickle interpreter that runs no code: only the opcodes and globals a PyTorch state dict needs.

Python's ``pickle`` calls whatever a pickle names (``os.system`` included) and allocates
what a length field claims. This interpreter instead resolves each ``GLOBAL`` against an
allow-list *before* anything is called, and every "call" (``REDUCE``/``NEWOBJ``) of an
allowed name is served by a small function of ours that builds an inert descriptor. So a
hostile pickle fails with ``UnsafePickleError`` at the offending opcode and nothing it
asked for happens. Lengths are checked against the bytes that are really there before
anything is read, so a malformed pickle raises ``FormatError`` and never allocates in
proportion to the numbers it contains.

>>> import pickle
>>> run_pickle(Reader(pickle.dumps({"a": [1, 2.5, "x"]}, protocol=2)), lambda pid: pid)
{'a': [1, 2.5, 'x']}
>>> run_pickle(Reader(b"cos\\nsystem\\n(S'touch x'\\ntR."), lambda pid: pid)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reshard.errors.UnsafePickleError: pickle: refuses global os.system...
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from reshard.errors import FormatError, ReshardError, UnsafePickleError

# data.pkl of a 70B model is about 100 KB and a 60-layer MoE with 40k tensors about 10 MB;
# the cap bounds both memory and interpretation time (linear, ~1 us per opcode).
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Bounds on work and on objects built, whatever the bytes: that 40k-tensor pickle runs
# about 1M opcodes and builds about 300k objects. A pickle of 64 MB of "}" would
# otherwise build 64M dicts (4 GB).
MAX_OPCODES = 16_000_000
MAX_OBJECTS = 4_000_000


class Reader:
    """Bounded reads from bytes or from a file positioned at a pickle's first byte.

    ``read(n)`` never allocates more than is really left (nor past ``limit``)."""

    def __init__(
        self,
        data: bytes | BinaryIO,
        size: int | None = None,
        name: str = "pickle",
        limit: int = MAX_PICKLE_BYTES,
    ) -> None:
        if isinstance(data, (bytes, bytearray)):
            import io

            size = len(data)
            data = io.BytesIO(data)
        self.file, self.left, self.name = data, min(size if size is not None else limit, limit), name
        self.consumed = 0

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.left:
            raise FormatError(
                f"{self.name}: pickle data is truncated or claims {n} bytes that are "
                "not there; the file is damaged"
            )
        data = self.file.read(n)
        if len(data) != n:
            raise FormatError(f"{self.name}: pickle data is truncated; the file is damaged")
        self.left -= n
        self.consumed += n
        return data

    def readline(self, limit: int = 64 * 1024) -> bytes:
        """One newline-terminated line (text opcodes, GLOBAL names), at most ``limit`` bytes."""
        line = self.file.readline(min(limit, self.left))
        if not line.endswith(b"\n"):
            raise FormatError(
                f"{self.name}: pickle text line is unterminated or longer than "
                f"{limit} bytes; the file is damaged"
            )
        self.left -= len(line)
        self.consumed += len(line)
        return line[:-1]


@dataclass(frozen=True, eq=False)
class Global:
    """An allowed global, as a value (a storage type, a dtype, a class used as a marker).

    ``record`` marks a class from a reader's own allow-list (``allow=`` of ``run_pickle``):
    calling it builds a ``Record``, never the class."""

    module: str
    name: str
    record: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Opaque:
    """A harmless data object we do not model (numpy scalar, Namespace): never built, never
    written; kept only so the surrounding training checkpoint can be read and reported."""

    qualname: str


@dataclass(eq=False)
class Record:
    """An object of a class on a reader's allow-list, kept as inert data: the class is never
    imported and no method of it runs. ``args`` are what the pickle passed to it (REDUCE /
    NEWOBJ) and ``state`` what BUILD gave it (a dict of attributes, or a tuple for classes
    with ``__getstate__``). Records hash by identity, so they can be dict keys, as DCP's
    ``MetadataIndex`` is.

    >>> r = Record("torch.distributed.checkpoint.metadata.MetadataIndex", ())
    >>> r.state = {"fqn": "w"}; r.get("fqn"), r.name
    ('w', 'MetadataIndex')
    """

    qualname: str
    args: tuple
    state: Any = None

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def get(self, attribute: str, default: Any = None) -> Any:
        """An attribute set by BUILD (dict state), else ``default``."""
        return self.state.get(attribute, default) if isinstance(self.state, dict) else default


class _Mark:
    pass


_MARK = _Mark()

# Callables a state dict pickle uses, served by the caller (reshard.formats.torchzip).
TENSOR_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}
STORAGE_TYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
    "UntypedStorage": "U8",
}
TORCH_DTYPES = {
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "double": "F64",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
# Plain data types seen in training checkpoints; represented as ``Opaque``, never constructed.
OPAQUE_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("argparse", "Namespace"),
    ("torch", "device"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}
_MARKER_GLOBALS = {
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


# Per-reader allow-lists (``run_pickle(allow=...)``): classes whose objects a training
# checkpoint's metadata holds. Each becomes a ``Record``; none is ever imported.
# torch.distributed.checkpoint's ``.metadata`` (torch 2.13; checked on real FSDP2 saves).
DCP_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint._hf_utils", "_HFStorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
    }
)
# DeepSpeed's model/optimizer state pickles (0.19.8): enums, loss scalers, fragment
# addresses; its own zero_to_fp32.py needs ``weights_only=False`` for exactly these.
DEEPSPEED_GLOBALS = frozenset(
    {
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleProfile"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleConfig"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    }
)


def resolve_global(
    module: str, name: str, where: str, allow: frozenset[tuple[str, str]] = frozenset()
) -> Global:
    """Accept a global only if it is on the allow-list (or the reader's ``allow``);
    otherwise refuse, naming it."""
    key = (module, name)
    if key in allow and key not in TENSOR_REBUILDERS:
        return Global(module, name, record=True)
    allowed = (
        key in TENSOR_REBUILDERS
        or key in _MARKER_GLOBALS
        or key in OPAQUE_GLOBALS
        or (module in ("torch", "torch.storage") and name in STORAGE_TYPES)
        or (module == "torch" and name in TORCH_DTYPES)
    )
    if not allowed:
        raise UnsafePickleError(
            f"{where}: refuses global {module}.{name}: a weights file never needs "
            "it, so the pickle may run code; nothing was executed. Re-save "
            "the state dict with torch.save(model.state_dict()) if you trust it"
        )
    return Global(module, name)


PersistentLoad = Callable[[Any], Any]
Call = Callable[[Global, tuple, str], Any]


def default_call(func: Global, args: tuple, where: str) -> Any:
    """Build the value of an allowed non-tensor call (containers and plain data)."""
    key = (func.module, func.name)
    if key == ("collections", "OrderedDict"):
        return dict(args[0]) if args else {}
    if key == ("torch", "Size"):
        return tuple(args[0]) if args else ()
    if key in (("builtins", "set"), ("builtins", "frozenset")):
        return list(args[0]) if args else []
    if key == ("_codecs", "encode"):
        if len(args) != 2 or not isinstance(args[0], str):
            raise FormatError(f"{where}: malformed bytes object in the pickle")
        return args[0].encode("latin-1")
    if key == ("builtins", "bytearray"):
        return bytes(args[0]) if args and isinstance(args[0], (bytes, bytearray)) else b""
    return Opaque(func.qualname)


def run_pickle(
    reader: Reader,
    persistent_load: PersistentLoad,
    call: Call | None = None,
    where: str = "pickle",
    allow: frozenset[tuple[str, str]] = frozenset(),
) -> Any:
    """Interpret one pickle from ``reader`` up to its STOP opcode and return its value.

    Args:
        persistent_load: maps a persistent id (torch: a ``("storage", ...)`` tuple) to a value.
        call: builds the value of an allowed callable applied to ``args``; defaults to
            ``default_call`` for containers; torch's tensor rebuilders must be served by it.
        allow: extra ``(module, name)`` classes this reader expects (``DCP_METADATA_GLOBALS``,
            ``DEEPSPEED_GLOBALS``); their objects come back as inert ``Record``s.

    >>> import pickle, pathlib
    >>> run_pickle(Reader(pickle.dumps(pathlib.PurePosixPath("/a/b"), protocol=4)), None,
    ...            allow=DCP_METADATA_GLOBALS)  # doctest: +ELLIPSIS
    Record(qualname='pathlib.PurePosixPath', args=('/', 'a', 'b'), state=None)

    Raises:
        UnsafePickleError: a global outside the allow-list (before anything is called).
        FormatError: anything malformed: bad opcode, truncation, stack underflow, bad types.
    """
    call = call or default_call
    try:
        return _Machine(reader, persistent_load, call, where, allow).run()
    except ReshardError:
        raise
    except RecursionError as e:
        raise FormatError(f"{where}: the pickle nests too deeply; the file is damaged") from e
    except Exception as e:  # any malformed input ends here as one clear error
        raise FormatError(
            f"{where}: malformed pickle ({type(e).__name__}: {str(e)[:80]}); "
            "the file is damaged or not a PyTorch checkpoint"
        ) from e


class _Machine:
    def __init__(
        self,
        reader: Reader,
        persistent_load: PersistentLoad,
        call: Call,
        where: str,
        allow: frozenset[tuple[str, str]] = frozenset(),
    ):
        self.r, self.persistent_load, self.call, self.where = reader, persistent_load, call, where
        self.allow = allow
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def run(self) -> Any:
        read = self.r.read
        ops = objects = 0
        while True:
            op = read(1)
            handler = _OPS.get(op)
            if handler is None:
                raise FormatError(
                    f"{self.where}: unsupported pickle opcode {op!r} at byte "
                    f"{self.r.consumed - 1}; not a PyTorch state dict pickle"
                )
            ops += 1
            objects += op in _BUILDS_OBJECT
            if ops > MAX_OPCODES or objects > MAX_OBJECTS:
                raise FormatError(
                    f"{self.where}: the pickle runs more than {MAX_OPCODES} opcodes or "
                    f"builds more than {MAX_OBJECTS} objects; not a state dict"
                )
            if handler is _stop:
                if len(self.stack) != 1 or self.metastack:
                    raise FormatError(f"{self.where}: pickle ends with an unbalanced stack")
                return self.stack[0]
            handler(self)

    # helpers used by the opcode handlers
    def pop_mark(self) -> list[Any]:
        items = self.stack
        if not self.metastack:
            raise FormatError(f"{self.where}: pickle pops a MARK that was never pushed")
        self.stack = self.metastack.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise FormatError(f"{self.where}: pickle stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise FormatError(f"{self.where}: pickle stack underflow")
        return self.stack[-1]

    def apply(self, func: Any, args: Any) -> Any:
        if not isinstance(func, Global):
            raise FormatError(f"{self.where}: pickle calls a non-callable {type(func).__name__}")
        if not isinstance(args, tuple):
            raise FormatError(f"{self.where}: pickle call arguments are not a tuple")
        if any(a is _MARK for a in args):
            raise FormatError(f"{self.where}: pickle passes a MARK as an argument")
        if func.record:
            return Record(func.qualname, args)
        return self.call(func, args, self.where)


def _u(fmt: str) -> Callable[[_Machine], int]:
    size = struct.calcsize(fmt)
    return lambda m: struct.unpack(fmt, m.r.read(size))[0]


_u1, _u2, _u4, _i4, _u8 = _u("<B"), _u("<H"), _u("<I"), _u("<i"), _u("<Q")


def _push(value_fn: Callable[[_Machine], Any]) -> Callable[[_Machine], None]:
    return lambda m: m.stack.append(value_fn(m))


def _stop(m: _Machine) -> None:  # handled in run()
    pass


def _global(m: _Machine) -> None:
    module = m.r.readline().decode("utf-8")
    name = m.r.readline().decode("utf-8")
    m.stack.append(resolve_global(module, name, m.where, m.allow))


def _stack_global(m: _Machine) -> None:
    name, module = m.pop(), m.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise FormatError(f"{m.where}: STACK_GLOBAL needs two strings")
    m.stack.append(resolve_global(module, name, m.where, m.allow))


def _reduce(m: _Machine) -> None:
    args = m.pop()
    func = m.pop()
    m.stack.append(m.apply(func, args))


def _newobj(m: _Machine) -> None:
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.apply(cls, args))


def _build(m: _Machine) -> None:
    state = m.pop()
    target = m.top()
    # A Record keeps its state as data; on anything else (e.g. a state dict's _metadata)
    # the state is not needed and never applied.
    if isinstance(target, Record) and target.state is None:
        target.state = state


def _binpersid(m: _Machine) -> None:
    m.stack.append(m.persistent_load(m.pop()))


def _mark(m: _Machine) -> None:
    m.metastack.append(m.stack)
    m.stack = []


def _tuple(m: _Machine) -> None:
    items = m.pop_mark()
    m.stack.append(tuple(items))


def _tuple_n(n: int) -> Callable[[_Machine], None]:
    def op(m: _Machine) -> None:
        if len(m.stack) < n:
            raise FormatError(f"{m.where}: pickle stack underflow")
        items = tuple(m.stack[len(m.stack) - n :])
        del m.stack[len(m.stack) - n :]
        m.stack.append(items)

    return op


def _list(m: _Machine) -> None:
    m.stack.append(m.pop_mark())


def _dict(m: _Machine) -> None:
    items = m.pop_mark()
    m.stack.append(_pairs_to_dict({}, items, m.where))


def _pairs_to_dict(d: dict, items: list, where: str) -> dict:
    if len(items) % 2:
        raise FormatError(f"{where}: pickle dict has an odd number of items")
    for k, v in zip(items[::2], items[1::2]):
        d[k] = v
    return d


def _setitem(m: _Machine) -> None:
    value, key = m.pop(), m.pop()
    target = m.top()
    if not isinstance(target, dict):
        raise FormatError(f"{m.where}: SETITEM on a {type(target).__name__}")
    target[key] = value


def _setitems(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if not isinstance(target, dict):
        raise FormatError(f"{m.where}: SETITEMS on a {type(target).__name__}")
    _pairs_to_dict(target, items, m.where)


def _append(m: _Machine) -> None:
    value = m.pop()
    target = m.top()
    if not isinstance(target, list):
        raise FormatError(f"{m.where}: APPEND on a {type(target).__name__}")
    target.append(value)


def _appends(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if not isinstance(target, list):
        raise FormatError(f"{m.where}: APPENDS on a {type(target).__name__}")
    target.extend(items)


def _additems(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.top()
    if not isinstance(target, list):
        raise FormatError(f"{m.where}: ADDITEMS on a {type(target).__name__}")
    target.extend(items)


def _put(index_fn: Callable[[_Machine], int]) -> Callable[[_Machine], None]:
    def op(m: _Machine) -> None:
        m.memo[index_fn(m)] = m.top()

    return op


def _get(index_fn: Callable[[_Machine], int]) -> Callable[[_Machine], None]:
    def op(m: _Machine) -> None:
        index = index_fn(m)
        if index not in m.memo:
            raise FormatError(f"{m.where}: pickle refers to memo entry {index}, which was never stored")
        m.stack.append(m.memo[index])

    return op


def _memoize(m: _Machine) -> None:
    m.memo[len(m.memo)] = m.top()


def _proto(m: _Machine) -> None:
    if _u1(m) > 5:
        raise FormatError(f"{m.where}: unsupported pickle protocol")


def _frame(m: _Machine) -> None:
    _u8(m)  # framing is a hint for buffered readers; the opcodes follow inline


def _long(n_fn: Callable[[_Machine], int]) -> Callable[[_Machine], Any]:
    return lambda m: int.from_bytes(m.r.read(n_fn(m)), "little", signed=True)


def _text(n_fn: Callable[[_Machine], int], decode: bool) -> Callable[[_Machine], Any]:
    def value(m: _Machine) -> Any:
        raw = m.r.read(n_fn(m))
        return raw.decode("utf-8", "surrogatepass") if decode else raw

    return value


def _binstring(n_fn: Callable[[_Machine], int]) -> Callable[[_Machine], Any]:
    return lambda m: m.r.read(n_fn(m)).decode("latin-1")


def _pop_op(m: _Machine) -> None:
    m.pop()


def _pop_mark_op(m: _Machine) -> None:
    m.pop_mark()


def _dup(m: _Machine) -> None:
    m.stack.append(m.top())


def _text_int(m: _Machine) -> Any:
    line = m.r.readline()
    if line == b"00":
        return False
    if line == b"01":
        return True
    if len(line) > 64:
        raise FormatError(f"{m.where}: pickle INT literal is too long")
    return int(line)


def _text_long(m: _Machine) -> Any:
    line = m.r.readline().rstrip(b"L")
    if len(line) > 4096:
        raise FormatError(f"{m.where}: pickle LONG literal is too long")
    return int(line)


def _text_string(m: _Machine) -> Any:
    line = m.r.readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise FormatError(f"{m.where}: malformed STRING opcode in the pickle")
    return line[1:-1].decode("unicode_escape") if b"\\" in line else line[1:-1].decode("latin-1")


_OPS: dict[bytes, Callable[[_Machine], None]] = {
    b"\x80": _proto,
    b"\x95": _frame,
    b".": _stop,
    b"(": _mark,
    b"0": _pop_op,
    b"1": _pop_mark_op,
    b"2": _dup,
    b"N": _push(lambda m: None),
    b"\x88": _push(lambda m: True),
    b"\x89": _push(lambda m: False),
    b"J": _push(_i4),
    b"K": _push(_u1),
    b"M": _push(_u2),
    b"I": _push(_text_int),
    b"L": _push(_text_long),
    b"\x8a": _push(_long(_u1)),
    b"\x8b": _push(_long(_i4)),
    b"G": _push(lambda m: struct.unpack(">d", m.r.read(8))[0]),
    b"F": _push(lambda m: float(m.r.readline()[:64])),
    b"X": _push(_text(_u4, True)),
    b"\x8c": _push(_text(_u1, True)),
    b"\x8d": _push(_text(_u8, True)),
    b"V": _push(lambda m: m.r.readline().decode("raw_unicode_escape")),
    b"S": _push(_text_string),
    b"T": _push(_binstring(_i4)),
    b"U": _push(_binstring(_u1)),
    b"B": _push(_text(_u4, False)),
    b"C": _push(_text(_u1, False)),
    b"\x8e": _push(_text(_u8, False)),
    b"\x96": _push(lambda m: bytearray(m.r.read(_u8(m)))),
    b"}": _push(lambda m: {}),
    b"]": _push(lambda m: []),
    b")": _push(lambda m: ()),
    b"\x8f": _push(lambda m: []),  # EMPTY_SET: sets are kept as lists
    b"d": _dict,
    b"l": _list,
    b"t": _tuple,
    b"\x85": _tuple_n(1),
    b"\x86": _tuple_n(2),
    b"\x87": _tuple_n(3),
    b"s": _setitem,
    b"u": _setitems,
    b"a": _append,
    b"e": _appends,
    b"\x90": _additems,
    b"\x91": lambda m: m.stack.append(m.pop_mark()),  # FROZENSET
    b"c": _global,
    b"\x93": _stack_global,
    b"R": _reduce,
    b"\x81": _newobj,
    b"b": _build,
    b"Q": _binpersid,
    b"q": _put(_u1),
    b"r": _put(_u4),
    b"p": _put(lambda m: int(m.r.readline()[:20])),
    b"h": _get(_u1),
    b"j": _get(_u4),
    b"g": _get(lambda m: int(m.r.readline()[:20])),
    b"\x94": _memoize,
}


# Opcodes that create a new Python object (containers, strings, numbers, call results).
_BUILDS_OBJECT = frozenset(
    bytes([c]) for c in b"}])(dlt\x85\x86\x87XC\x8cB\x8d\x8e\x96TUSVIL\x8a\x8bFG\x8f\x91R\x81\x92Q"
)


def _newobj_ex(m: _Machine) -> None:
    kwargs, args, cls = m.pop(), m.pop(), m.pop()
    if kwargs:
        raise FormatError(f"{m.where}: NEWOBJ_EX with keyword arguments is not supported")
    m.stack.append(m.apply(cls, args))


_OPS[b"\x92"] = _newobj_ex
