"""Tiny real models for the quantization tests: a Llama with a trained byte-level BPE
tokenizer (built here with the ``tokenizers`` library), or with a sentencepiece
``tokenizer.model`` trained here by sentencepiece's own trainer (Llama 2's settings:
BPE, byte fallback, digits split). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "reshard streams tensors into shards.",
    "Quantization trades a little accuracy for a lot of memory.",
    "llama.cpp reads GGUF files.",
    "Hello world! 12345 numbers, punctuation; and  spaces.",
] * 20
PROMPTS = ["The quick brown fox", "Hello world! 123", "shards of GGUF"]

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def make_bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    """Train a GPT-2 style byte-level BPE and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_sentencepiece_tokenizer(folder: Path, vocab_size: int) -> int:
    """Train a Llama-2 style sentencepiece BPE (byte fallback, split digits, ids
    unk=0 bos=1 eos=2) into ``folder/tokenizer.model``, with the tokenizer_config.json
    that names its special tokens; return the vocabulary size."""
    import json

    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab_size


def make_tiny_llama(
    folder: Path,
    seed: int = 0,
    dtype: str = "float32",
    std: float = 0.2,
    tokenizer: str = "bpe",
    **overrides,
) -> Path:
    """Save a tiny random LlamaForCausalLM plus its tokenizer (``"bpe"``: a byte-level
    BPE tokenizer.json; ``"sentencepiece"``: a tokenizer.model only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if tokenizer == "sentencepiece":
        vocab, special = make_sentencepiece_tokenizer(folder, 320), {"bos_token_id": 1, "eos_token_id": 2}
    else:
        make_bpe_tokenizer(folder, 320)
        from transformers import AutoTokenizer

        vocab, special = len(AutoTokenizer.from_pretrained(folder)), {"bos_token_id": 0, "eos_token_id": 1}
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": vocab, **special, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so quantization shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def hf_logits(model, ids) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))
