"""llama.cpp itself (through llama-cpp-python, a pinned test-only dependency built from its
sdist once, then reused from pip's wheel cache) loads what ``split --quantize`` writes:
the gguf-split set of the tiny Llama with a real BPE tokenizer, and the single file of the
one with a sentencepiece tokenizer. Its logits agree with the source transformers model
and its tokenizer gives the source tokenizer's ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.quant_models import PROMPTS, TEXT, cosine, hf_logits
from tests.test_gguf_llama import llama_dir, q8_split, source_model  # noqa: F401  (fixtures)
from tests.test_gguf_sentencepiece import SAMPLES, sp_gguf, sp_llama  # noqa: F401  (fixtures)

BPE_SAMPLES = [
    *PROMPTS,
    TEXT[2],
    "Numbers 2026 and 1234567.",
    "GGUF-split; shards!",
    "  two  spaces\nnew line",
]


def _llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False, seed=0
    )


def _logits(llm, ids: list[int]):
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


@pytest.fixture(scope="module")
def split_llama(q8_split):  # noqa: F811
    out, _ = q8_split
    files = sorted(out.glob("*.gguf"))
    assert len(files) >= 3 and files[0].name.endswith(f"-00001-of-{len(files):05d}.gguf")
    llm = _llama(files[0])  # llama.cpp finds the other splits from the first file's name
    yield llm
    llm.close()


def test_llama_cpp_loads_the_split_files(split_llama, q8_split, source_model):  # noqa: F811
    import llama_cpp

    from reshard.formats.gguf import read_gguf_folder

    out, result = q8_split
    tensors = read_gguf_folder(out).tensors
    model = split_llama.model
    # every tensor of every split was loaded: parameter count and data size add up
    assert llama_cpp.llama_model_n_params(model) == sum(t.numel for t in tensors)
    assert llama_cpp.llama_model_size(model) == result["quantize"]["bytes_after"]
    assert split_llama.n_vocab() == len(source_model[1])


def test_llama_cpp_logits_match_the_source(split_llama, source_model):  # noqa: F811
    ref_model, ref_tok = source_model
    for prompt in PROMPTS:
        ids = ref_tok(prompt, add_special_tokens=False)["input_ids"]
        got, want = _logits(split_llama, ids), hf_logits(ref_model, ids)
        assert got.shape == want.shape
        assert cosine(got, want) >= 0.999, prompt


def test_llama_cpp_bpe_tokenizer_gives_the_source_ids(split_llama, source_model):  # noqa: F811
    _, ref_tok = source_model
    for text in BPE_SAMPLES:
        want = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert split_llama.tokenize(text.encode(), add_bos=False, special=False) == want, text
        assert split_llama.detokenize(want).decode() == text


def test_llama_cpp_sentencepiece_tokenizer_gives_the_source_ids(sp_llama, sp_gguf):  # noqa: F811
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_llama / "tokenizer.model"))
    llm = _llama(sp_gguf)
    try:
        for text in [*SAMPLES, "  leading spaces", "tabs\tand\nlines"]:
            want = sp.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
            assert llm.tokenize(text.encode(), add_bos=True) == [sp.bos_id(), *want]
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(sp_llama).eval()
        ids = [sp.bos_id(), *sp.encode(PROMPTS[1])]
        assert cosine(_logits(llm, ids), hf_logits(ref, ids)) >= 0.999
    finally:
        llm.close()
