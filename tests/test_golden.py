"""Golden outputs: the sha256 of every file that a fixed set of jobs writes.

The hashes in ``golden/outputs.json`` were recorded with the code as it was before the
run-pipeline / writer-interface refactor (issue 19), so any change to the bytes reshard
writes shows up here: splits of safetensors and ``.bin`` sources, ``--dtype bf16``,
``--tp 2``, ``--pp 2``, merges of both, and ``--resume`` after a kill -9 mid-shard.

The sources are generated deterministically (numpy's seeded generator, the reference
safetensors writer, torch.save of the same arrays), and the provenance keys reshard writes
hold nothing time- or path-dependent, so the bytes only depend on reshard itself and its
version string. To re-record after an intended format change:
``RESHARD_GOLDEN_RECORD=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import random_tensors, run_cli, tree_checksums, write_safetensors
from pausing import pausing_command, wait_stopped

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
RECORD = os.environ.get("RESHARD_GOLDEN_RECORD") == "1"

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "rms_norm_eps": 1e-5,
}


def llama_specs() -> dict[str, tuple[tuple[int, ...], str]]:
    h, inter, kv = 64, 128, 32
    specs = {
        "model.embed_tokens.weight": ((256, h), "float32"),
        "model.norm.weight": ((h,), "float32"),
        "lm_head.weight": ((256, h), "float32"),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        specs.update(
            {
                p + "self_attn.q_proj.weight": ((h, h), "float32"),
                p + "self_attn.k_proj.weight": ((kv, h), "float32"),
                p + "self_attn.v_proj.weight": ((kv, h), "float32"),
                p + "self_attn.o_proj.weight": ((h, h), "float32"),
                p + "mlp.gate_proj.weight": ((inter, h), "float32"),
                p + "mlp.up_proj.weight": ((inter, h), "float32"),
                p + "mlp.down_proj.weight": ((h, inter), "float32"),
                p + "input_layernorm.weight": ((h,), "float32"),
                p + "post_attention_layernorm.weight": ((h,), "float32"),
            }
        )
    return specs


def make_sources(root: Path) -> tuple[Path, Path]:
    """A two-file safetensors folder and the same tensors as two torch.save ``.bin`` files."""
    import torch

    tensors = random_tensors(19, llama_specs())
    names = sorted(tensors)
    halves = {1: names[: len(names) // 2], 2: names[len(names) // 2 :]}
    st, pt = root / "st", root / "bin"
    for folder, ext, index_name in (
        (st, "safetensors", "model.safetensors.index.json"),
        (pt, "bin", "pytorch_model.bin.index.json"),
    ):
        folder.mkdir(parents=True)
        weight_map = {}
        for number, part in halves.items():
            prefix = "model" if ext == "safetensors" else "pytorch_model"
            file_name = f"{prefix}-0000{number}-of-00002.{ext}"
            arrays = {n: tensors[n] for n in part}
            if ext == "safetensors":
                write_safetensors(folder / file_name, arrays)
            else:
                torch.save(
                    {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()},
                    folder / file_name,
                )
            weight_map.update(dict.fromkeys(part, file_name))
        total = sum(a.nbytes for a in tensors.values())
        (folder / index_name).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
        (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2))
        (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return st, pt


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    return make_sources(tmp_path_factory.mktemp("golden"))


def cli_ok(*args: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr


def job_outputs(sources: tuple[Path, Path], out: Path) -> dict[str, dict[str, str]]:
    """Run every job; return {job: {relative file: sha256}}."""
    st, pt = sources
    jobs = {
        "split-safetensors": ("split", str(st), "--max-shard", "40000"),
        "split-bin": ("split", str(pt), "--max-shard", "40000"),
        "split-single": ("split", str(st), "--max-shard", "10MB"),
        "split-bf16": ("split", str(st), "--max-shard", "30000", "--dtype", "bf16"),
        "split-bin-bf16": ("split", str(pt), "--max-shard", "30000", "--dtype", "bf16"),
        "tp2": ("split", str(st), "--tp", "2", "--max-shard", "30000"),
        "pp2": ("split", str(st), "--pp", "2", "--max-shard", "30000"),
    }
    results = {}
    for job, args in jobs.items():
        cli_ok(*args, "-o", str(out / job), "-q")
        results[job] = tree_checksums(out / job)
    for job in ("tp2", "pp2"):
        cli_ok("merge", str(out / job), "-o", str(out / f"merge-{job}"), "--max-shard", "40000", "-q")
        results[f"merge-{job}"] = tree_checksums(out / f"merge-{job}")
    return results


def test_outputs_match_golden_hashes(sources, tmp_path):
    results = job_outputs(sources, tmp_path)
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(results) == set(golden)
    for job in golden:
        assert results[job] == golden[job], job


def test_resume_after_kill_matches_golden_hashes(sources, tmp_path):
    """kill -9 in the middle of shard 3, then --resume: the same bytes as an unbroken run."""
    st, _ = sources
    out = tmp_path / "resumed"
    args = ["split", str(st), "--max-shard", "40000", "-o", str(out), "-q"]
    proc = subprocess.Popen(
        pausing_command("mid:model-00003-of-00012.safetensors", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_stopped(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    cli_ok(*args, "--resume")
    golden = json.loads(GOLDEN.read_text())
    assert tree_checksums(out) == golden["split-safetensors"]
