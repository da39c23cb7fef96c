"""A sentencepiece ``tokenizer.model`` becomes GGUF's "llama" tokenizer (tokens, scores,
types), and the GGUF tokenizer encodes as the source sentencepiece model does.

The tokenizer is trained in the test session by sentencepiece's own trainer (Llama 2's
settings); the reference ids come from ``sentencepiece.SentencePieceProcessor`` on that
model, the ids under test from transformers' GGUF tokenizer loader, which builds its
tokenizer from the GGUF metadata alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.quant_models import PROMPTS, TEXT, cosine, hf_logits, make_tiny_llama

# Strings the GGUF tokenizer must encode as sentencepiece does: merges, digits split one by
# one, punctuation, and characters outside the training text (byte fallback).
SAMPLES = [*PROMPTS, TEXT[2], "Numbers 2026 and 1234567.", "ünïcödé 🙂 and\nnewlines", "GGUF-split; shards!"]


@pytest.fixture(scope="session")
def sp_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-spm") / "tiny", tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def sp_gguf(sp_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm-q8") / "tiny-q8"
    proc = run_cli("split", str(sp_llama), "-o", str(out), "--quantize", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer" not in proc.stderr  # no "no vocabulary" warning
    return out / "tiny-Q8_0.gguf"


def test_tokenizer_model_becomes_llama_vocab_with_scores_and_types(sp_llama, sp_gguf):
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_llama / "tokenizer.model"))
    reader = gguf.GGUFReader(sp_gguf)

    def field(key):
        return reader.get_field(key).contents()

    assert field("tokenizer.ggml.model") == "llama"
    tokens, scores, types = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.scores"),
        field("tokenizer.ggml.token_type"),
    )
    assert len(tokens) == len(scores) == len(types) == sp.vocab_size()
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    want_types = [
        gguf.TokenType.UNKNOWN
        if sp.is_unknown(i)
        else gguf.TokenType.CONTROL
        if sp.is_control(i)
        else gguf.TokenType.BYTE
        if sp.is_byte(i)
        else gguf.TokenType.NORMAL
        for i in range(sp.vocab_size())
    ]
    assert types == [int(t) for t in want_types]
    assert types.count(int(gguf.TokenType.BYTE)) == 256  # byte fallback pieces <0x00>..<0xFF>
    assert field("tokenizer.ggml.bos_token_id") == sp.bos_id() == 1
    assert field("tokenizer.ggml.eos_token_id") == sp.eos_id() == 2
    assert field("tokenizer.ggml.unknown_token_id") == sp.unk_id() == 0


def test_transformers_gguf_tokenizer_encodes_like_sentencepiece(sp_llama, sp_gguf):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_llama / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
    for text in SAMPLES:
        want = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == want, text
        assert tok(text)["input_ids"] == [sp.bos_id(), *want]  # add_bos_token kept
        assert tok.decode(want) == text


def test_sentencepiece_gguf_model_agrees_with_source(sp_llama, sp_gguf):
    import sentencepiece
    from transformers import AutoModelForCausalLM

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_llama / "tokenizer.model"))
    ref = AutoModelForCausalLM.from_pretrained(sp_llama).eval()
    model = AutoModelForCausalLM.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name).eval()
    ids = [sp.bos_id(), *sp.encode(PROMPTS[0])]
    assert cosine(hf_logits(model, ids), hf_logits(ref, ids)) >= 0.999


def test_no_tokenizer_warns_and_writes_a_vocabulary_less_file(sp_llama, tmp_path):
    import shutil

    import gguf

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(sp_llama / name, bare / name)
    proc = run_cli("split", str(bare), "-o", str(tmp_path / "out"), "--quantize", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "no vocabulary" in proc.stderr
    reader = gguf.GGUFReader(tmp_path / "out" / "bare-Q8_0.gguf")
    assert reader.get_field("tokenizer.ggml.model") is None
    assert json.loads(proc.stdout)["quantize"]["type"] == "Q8_0"
