"""Shared fixtures: real checkpoints on disk under tmp_path, and the CLI as a subprocess.

Everything here writes under pytest's tmp_path; nothing touches the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session) -> None:
    """Write reshard's bytecode once: the tests start hundreds of ``reshard`` processes, and
    where ``PYTHONDONTWRITEBYTECODE`` is set each would compile every module again (0.2 s).
    """
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "reshard"), quiet=1)


# A Mistral small enough for CPU tests, with every structural feature of the real one
# (GQA: 4 query heads, 2 KV heads; SwiGLU MLP; RMSNorm).
TINY_MISTRAL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()
    }


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``reshard`` as a real subprocess; returns the completed process (never raises
    on a non-zero exit, so tests can assert on it)."""
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    full_env.pop("RESHARD_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def make_tiny_mistral(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random MistralForCausalLM with transformers' own save_pretrained."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{**TINY_MISTRAL, **overrides})).eval()
    model.save_pretrained(folder)
    return Path(folder)


def logits_of(folder: Path, **kwargs) -> torch.Tensor:
    """Logits of a fixed prompt from a model folder loaded by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write with the reference safetensors writer (numpy flavour)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return Path(path)


def random_tensors(seed: int, specs: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Deterministic random arrays: ``{"w": ((4, 8), "float32")}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in specs.items():
        if np.dtype(dtype).kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[name] = rng.integers(0, 100, size=shape).astype(dtype)
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A saved tiny Mistral (single model.safetensors + config); do not modify it."""
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral") / "model")


@pytest.fixture(scope="session")
def tiny_mistral_logits(tiny_mistral_dir) -> torch.Tensor:
    return logits_of(tiny_mistral_dir)
