"""The GGUF shard format (llama.cpp): descriptors for a model's GGUF tensors, the header
built by llama.cpp's own ``gguf`` package, and gguf-split's multi-file layout.

What comes from ``gguf`` rather than by hand: the header, KV and tensor-info encoding
(``GGUFWriter``, fed an in-memory file so reshard's ``ShardWriter`` streams the data),
alignment, metadata key names, tensor names (``get_tensor_name_map``), file types, and
the tokenizer conversion (``BpeVocab``, ``SentencePieceVocab``, ``SpecialVocab``). What
``gguf`` does not do in bounded memory, reshard does: the data are streamed and quantized
band by band (``reshard.quant.stream``) instead of ``GGUFWriter.write_tensor_data``'s
whole-tensor arrays, and the llama q/k row permutation is expressed as extents over the
source (no copy).

>>> fmt = GGUFFormat("tiny", "Q8_0", {})
>>> fmt.shard_file_name(1, 1), fmt.shard_file_name(2, 3)
('tiny-Q8_0.gguf', 'tiny-00002-of-00003.gguf')
>>> [(e.offset, e.dest, e.rows) for e in permuted_extents(_demo_tensor(), n_head=1)]
[(0, 0, 2), (32, 16, 2)]
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from reshard.errors import FormatError, UsageError, VerifyError
from reshard.quant import GGUF_TYPES, quantized_nbytes
from reshard.tensors import Checkpoint, Extent, Quantization, TensorInfo, natural_key
from reshard.units import FLOAT_DTYPES, dtype_itemsize
from reshard.writers.base import ShardLayout

log = logging.getLogger(__name__)

ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT; checked against the package in GGUFFormat


@dataclass(frozen=True)
class Family:
    """How one transformers model type maps to a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH_NAMES value
    permute_qk: bool  # llama.cpp's converter permutes q/k rows (rotary layout) for llama
    head_dim_keys: bool  # write attention.key_length/value_length (head_dim != hidden/heads)


# The families the gguf tensor-name map covers with no special conversion code.
FAMILIES = {
    "llama": Family("llama", True, False),
    "mistral": Family("llama", True, False),
    "qwen2": Family("qwen2", False, False),
    "qwen3": Family("qwen3", False, True),
}

# tokenizer.ggml.pre for BPE tokenizers, recognised by their pre-tokenizer regex (llama.cpp
# names them by hashing tokenizer outputs in convert_hf_to_gguf.py, which gguf does not ship).
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

FILE_TYPES = {
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "F32": "ALL_F32",
}


def _demo_tensor() -> TensorInfo:
    return TensorInfo.from_file("w", "F32", (4, 4), Path("m"), 0, 64)


def permuted_extents(t: TensorInfo, n_head: int) -> tuple[Extent, ...]:
    """llama.cpp's q/k permutation as extents: output row ``h*hd + 2i + j`` is source row
    ``h*hd + j*hd/2 + i`` (``w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2)``)."""
    if not t.is_single_range or len(t.shape) != 2:
        raise FormatError(
            f"tensor {t.name!r}: q/k rows can only be permuted for a tensor stored "
            "in one piece; convert the checkpoint to safetensors first"
        )
    rows, cols = t.shape
    if rows % (2 * n_head):
        raise FormatError(f"tensor {t.name!r}: {rows} rows do not split into {n_head} heads")
    rb = cols * dtype_itemsize(t.stored_dtype)
    hd, src = rows // n_head, t.extents[0]
    half = hd // 2
    return tuple(
        Extent(
            src.source,
            src.offset + (h * hd + j * half) * rb,
            rb,
            dest=(h * hd + j) * rb,
            rows=half,
            src_stride=rb,
            dest_stride=2 * rb,
        )
        for h in range(n_head)
        for j in range(2)
    )


def read_config(checkpoint: Checkpoint) -> dict:
    """The source's config.json (from its extra files), or a one-line error."""
    for path in checkpoint.extra_files:
        if Path(path).name == "config.json":
            return json.loads(Path(path).read_text(encoding="utf-8"))
    raise UsageError(
        "GGUF output needs the model's config.json beside the weights "
        "(it gives the architecture and hyperparameters)"
    )


def family_of(config: dict) -> Family:
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UsageError(
            f"model type {model_type!r} cannot be written as GGUF by reshard; "
            f"supported: {', '.join(sorted(FAMILIES))} (or use --quantize fp8)"
        )
    return family


def gguf_tensor(t: TensorInfo, gguf_name: str, qtype: str) -> TensorInfo:
    """``t`` as GGUF writes it: norms and 1-D tensors F32, matrices ``qtype``, F16 for
    rows that are not a multiple of the block size."""
    if t.stored_dtype not in FLOAT_DTYPES:
        raise FormatError(
            f"tensor {t.name!r} is {t.stored_dtype}; GGUF output takes floating-point weights only"
        )
    t = replace(t, name=gguf_name)
    if len(t.shape) < 2 or gguf_name.endswith("_norm.weight") or qtype == "F32":
        return t.converted_to("F32")
    if qtype in ("F16", "BF16"):
        return t.converted_to(qtype)
    cols = 1
    for d in t.shape[1:]:
        cols *= d
    if cols % 32:
        log.warning("tensor %r: rows of %d are not a multiple of 32; written as F16", t.name, cols)
        return t.converted_to("F16")
    return replace(
        t,
        dtype=qtype,
        src_dtype=t.stored_dtype,
        quant=Quantization(qtype, t.shape),
        nbytes=quantized_nbytes(qtype, t.shape),
    )


def gguf_checkpoint(checkpoint: Checkpoint, quant: str) -> tuple[Checkpoint, dict]:
    """The GGUF tensors of ``checkpoint`` (GGUF names, permuted q/k, quantized) and the
    config, for ``--quantize quant`` (``q8_0``, ``q4_0``, ``f16``, ``bf16``, ``f32``).

    Raises:
        UsageError: a model type GGUF output does not cover, no config.json.
        FormatError: a tensor llama.cpp's name map does not know.
    """
    import gguf

    config = read_config(checkpoint)
    family = family_of(config)
    qtype = GGUF_TYPES[quant]
    n_blocks = int(config["num_hidden_layers"])
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family.arch)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    out = []
    for t in checkpoint.tensors:
        if t.name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FormatError(
                f"tensor {t.name!r} has no GGUF name for arch {family.arch!r}; "
                "llama.cpp's converter would need special code for it"
            )
        if family.permute_qk and t.name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if t.name.endswith("q_proj.weight") else n_kv
            t = replace(t, extents=permuted_extents(t, heads))
        out.append(gguf_tensor(t, name, qtype))
    ck = replace(checkpoint, tensors=tuple(out), extra_files=(), format="gguf")
    return ck, config


class GGUFFormat:
    """``<name>-Q8_0.gguf``, or gguf-split's ``<name>-00001-of-0000N.gguf`` files: model
    metadata in the first, ``split.no``/``split.count``/``split.tensors.count`` in each,
    every file a complete GGUF. No index file (llama.cpp finds the splits by name).

    ``kv`` is filled by ``build_kv`` (model hyperparameters and tokenizer); ``assign``
    tells the format which tensors each shard holds, since a shard's header depends on
    its number."""

    name = "gguf"
    index_file_name = ""  # none: the pipeline writes no index when this is empty

    def __init__(self, stem: str, qtype: str, kv: dict) -> None:
        import gguf

        assert gguf.GGUF_DEFAULT_ALIGNMENT == ALIGNMENT
        self.stem, self.qtype, self.kv = stem, qtype, kv
        self.single_file_name = f"{stem}-{qtype}.gguf"
        self._shard_of: dict[str, tuple[int, int]] = {}
        self._total = 0

    def shard_file_name(self, number: int, count: int) -> str:
        from gguf.gguf_writer import SHARD_NAME_FORMAT

        return self.single_file_name if count == 1 else SHARD_NAME_FORMAT.format(self.stem, number, count)

    def assign(self, shards: Sequence[Sequence[str]]) -> None:
        """Record which tensor names each shard holds (in plan order)."""
        count = len(shards)
        self._shard_of = {n: (i, count) for i, names in enumerate(shards) for n in names}
        self._total = sum(len(names) for names in shards)

    def layout(self, tensors: Sequence[TensorInfo], metadata: dict[str, str]) -> ShardLayout:
        import gguf
        import numpy as np
        from gguf.gguf_writer import WriterState

        number, count = self._shard_of[tensors[0].name] if tensors else (0, 1)
        writer = gguf.GGUFWriter(
            None, self.kv.get("general.architecture").value if "general.architecture" in self.kv else "llama"
        )
        writer.kv_data = [dict(self.kv) if number == 0 else {}]
        if count > 1:
            split = gguf.Keys.Split
            writer.kv_data[0][split.LLM_KV_SPLIT_NO] = gguf.GGUFValue(number, gguf.GGUFValueType.UINT16)
            writer.kv_data[0][split.LLM_KV_SPLIT_COUNT] = gguf.GGUFValue(count, gguf.GGUFValueType.UINT16)
            writer.kv_data[0][split.LLM_KV_SPLIT_TENSORS_COUNT] = gguf.GGUFValue(
                self._total, gguf.GGUFValueType.INT32
            )
        for t in tensors:
            writer.add_tensor_info(
                t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.dtype]
            )
        buffer = io.BytesIO()
        writer.fout = [buffer]  # type: ignore[list-item]
        writer.state = WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        header = buffer.getvalue()
        header += bytes(_pad(len(header)) - len(header))
        placements, cursor = [], len(header)
        for t in tensors:
            placements.append((t, cursor))
            cursor += _pad(t.nbytes)
        return ShardLayout(header, tuple(placements), cursor)

    def index_text(self, weight_map: dict[str, str], checkpoint: Checkpoint, metadata: dict[str, str]) -> str:
        return ""

    def read_back(self, folder: Path) -> dict[str, TensorInfo]:
        """Every tensor of a written GGUF folder, checking the split keys agree."""
        from reshard.formats.gguf import read_gguf_folder

        return {t.name: t for t in read_gguf_folder(Path(folder)).tensors}


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def build_kv(
    config: dict, qtype: str, name: str, tokenizer_dir: Path | None, n_vocab: int
) -> tuple[dict, list[str]]:
    """The first shard's KV data (``gguf`` key names and types), and warnings."""
    import gguf

    family = family_of(config)
    w = gguf.GGUFWriter(None, family.arch)
    w.add_name(name)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    w.add_vocab_size(n_vocab)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(head_dim)
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if theta:
        w.add_rope_freq_base(float(theta))
    if family.head_dim_keys:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    warnings = add_tokenizer(w, tokenizer_dir, n_vocab)
    return dict(w.kv_data[0]), warnings


def add_tokenizer(w, folder: Path | None, n_vocab: int) -> list[str]:
    """Tokenizer metadata through gguf's own converters: a ``tokenizer.json`` BPE becomes
    "gpt2" (tokens, types, merges, pre-tokenizer), a sentencepiece ``tokenizer.model``
    "llama" (tokens, scores, types); special ids and the chat template are kept."""
    import gguf
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab

    if folder is None or not ((folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()):
        return ["no tokenizer.json or tokenizer.model beside the weights: the GGUF has no vocabulary"]
    vocab = None
    warnings: list[str] = []
    if (folder / "tokenizer.json").exists():
        try:
            vocab = BpeVocab(folder)
        except FileNotFoundError:
            vocab = None
    if vocab is None and (folder / "tokenizer.model").exists():
        vocab = SentencePieceVocab(folder)  # type: ignore[assignment]  # both are gguf Vocabs
    if vocab is None:
        return [
            "tokenizer.json is not a byte-level BPE and there is no tokenizer.model: "
            "the GGUF has no vocabulary"
        ]
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), n_vocab):  # llama.cpp needs one token per embedding row
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        pre = _pre_tokenizer(folder / "tokenizer.json")
        if pre == "default":
            warnings.append('unrecognised BPE pre-tokenizer: tokenizer.ggml.pre is "default"')
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if vocab.tokenizer_model == "llama":
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    if isinstance(vocab, SentencePieceVocab):
        # SpecialVocab finds ids in tokenizer.json or config.json; a folder with only
        # tokenizer.model names them in the model itself (unk, and bos/eos/pad when set)
        sp = vocab.sentencepiece_tokenizer
        for role, token_id in (
            ("unk", sp.unk_id()),
            ("bos", sp.bos_id()),
            ("eos", sp.eos_id()),
            ("pad", sp.pad_id()),
        ):
            if token_id >= 0:
                special.special_token_ids.setdefault(role, token_id)
    special.add_to_gguf(w, quiet=True)
    return warnings


def _pre_tokenizer(path: Path) -> str:
    doc = json.loads(path.read_text(encoding="utf-8"))
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    return "default"


def shard_names(tensors: dict[str, TensorInfo]) -> list[str]:
    """File names of the shards holding ``tensors``, in order."""
    return sorted({t.file.name for t in tensors.values() if t.file}, key=natural_key)


__all__ = ["FAMILIES", "GGUFFormat", "gguf_checkpoint", "build_kv", "VerifyError"]
