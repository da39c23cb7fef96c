"""``reshard split`` / ``inspect`` / ``verify --against`` on genuine training checkpoints,
as real subprocesses: the shards equal the training stack's own consolidation bit for
bit, and transformers loads them with identical logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, sha256_file
from safetensors.torch import load_file
from training_fixtures import CHECKPOINTS, reference_state_dict, training_checkpoints  # noqa: F401

PROMPT = torch.arange(1, 17).unsqueeze(0) % 101


def written(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, through the reference safetensors reader."""
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        for name, value in load_file(path).items():
            assert name not in tensors
            tensors[name] = value
    return tensors


def logits(model_or_folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_folder
    if isinstance(model_or_folder, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_folder)
    with torch.no_grad():
        return model.eval()(PROMPT).logits


def reference_logits(config_folder: Path, reference: dict) -> torch.Tensor:
    """The model transformers builds from the stack's own full state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder))
    missing, unexpected = model.load_state_dict(reference, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return logits(model)


def config_folder_of(root: Path, name: str) -> Path:
    return root / (
        "ds/" + name + "/checkpoint-2" if name.startswith("zero") else "mesh" if name == "mesh2d" else "fsdp"
    )


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_split_equals_consolidation_and_loads_with_identical_logits(training_checkpoints, tmp_path, name):
    source = training_checkpoints / CHECKPOINTS[name]
    out = tmp_path / "out"
    proc = run_cli("split", str(source), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    reference = reference_state_dict(training_checkpoints, name)
    tensors = written(out)
    assert set(tensors) == set(reference) - {"lm_head.weight"}
    for key, value in tensors.items():
        ref = reference[key]  # dtype included: fp32 masters, the frozen norm in its own bf16
        assert value.dtype == ref.dtype and torch.equal(value, ref), key
    assert (out / "config.json").is_file()
    assert not (out / "trainer_state.json").exists() and not (out / "zero_to_fp32.py").exists()
    if name != "hf-storage":
        assert "lm_head.weight" in result["dropped"]
    if name in ("zero1", "zero2", "zero3", "fsdp2", "torchtitan"):
        assert result["skipped"]["optimizer state"]["size"] > result["total_size"]
    assert torch.equal(logits(out), reference_logits(config_folder_of(training_checkpoints, name), reference))
    check = run_cli("verify", str(out), "--against", str(source), "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["compared_bytes"] == result["total_size"]


def test_bf16_casts_exactly_as_torch_does_and_shards(training_checkpoints, tmp_path):
    source = training_checkpoints / CHECKPOINTS["zero3"]
    out = tmp_path / "bf16"
    proc = run_cli("split", str(source), "-o", str(out), "--dtype", "bf16", "--max-shard", "12KB", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    reference = reference_state_dict(training_checkpoints, "zero3")
    for key, value in written(out).items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_inspect_shows_what_the_checkpoint_holds(training_checkpoints):
    proc = run_cli("inspect", str(training_checkpoints / CHECKPOINTS["zero2"]), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "deepspeed"
    facts = summary["facts"]
    assert (facts["ZeRO stage"], facts["world size"], facts["step"], facts["tag"]) == (
        2,
        2,
        2,
        "global_step2",
    )
    assert summary["skipped"]["optimizer state"]["tensors"] == 6  # step, exp_avg, exp_avg_sq x 2 ranks
    mesh = json.loads(run_cli("inspect", str(training_checkpoints / CHECKPOINTS["mesh2d"]), "--json").stdout)
    assert (mesh["format"], mesh["facts"]["ranks"], mesh["facts"]["chunks per dim"]) == ("dcp", 4, "2 x 2")
    text = run_cli("inspect", str(training_checkpoints / CHECKPOINTS["fsdp2"]))
    assert text.returncode == 0 and "skipped optimizer state: " in text.stdout


def test_dry_run_plans_from_metadata_and_writes_nothing(training_checkpoints, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "split", str(training_checkpoints / CHECKPOINTS["torchtitan"]), "-o", str(out), "--dry-run", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    reference = reference_state_dict(training_checkpoints, "torchtitan")
    assert plan["dry_run"] and plan["dropped"].keys() == {"lm_head.weight"}
    assert plan["total_parameters"] == sum(v.numel() for k, v in reference.items() if k != "lm_head.weight")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_checksum_and_resume_after_kill(training_checkpoints, tmp_path):
    """--checksum reports the files' sha256; a run killed -9 after its second shard and
    rerun with --resume keeps the verified shards and ends byte-identical."""
    import os
    import signal
    import subprocess

    from pausing import pausing_command, wait_stopped

    source = training_checkpoints / CHECKPOINTS["mesh2d"]
    fresh = tmp_path / "fresh"
    proc = run_cli("split", str(source), "-o", str(fresh), "--checksum", "--json", "--max-shard", "20KB")
    assert proc.returncode == 0, proc.stderr
    sums = json.loads(proc.stdout)["sha256"]
    assert sums == {p.name: sha256_file(p) for p in sorted(fresh.iterdir())}
    assert len([n for n in sums if n.endswith(".safetensors")]) == 4
    out = tmp_path / "out"
    args = ("split", str(source), "-o", str(out), "--max-shard", "20KB", "-q")
    killed = subprocess.Popen(
        pausing_command("after:model-00002-of-00004.safetensors", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_stopped(killed.pid)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    assert not out.exists()
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "kept 2 of 4" in proc.stderr, proc.stderr
    assert {p.name: sha256_file(p) for p in sorted(out.iterdir())} == sums


def test_no_config_warns_and_config_option_supplies_it(training_checkpoints, tmp_path):
    bare = tmp_path / "bare" / "run" / "step-2"
    shutil.copytree(training_checkpoints / CHECKPOINTS["fsdp2"], bare)
    out = tmp_path / "weights-only"
    proc = run_cli("split", str(bare), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "no config.json beside the checkpoint" in proc.stderr and "--config" in proc.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors"}
    # Without a config saying the embeddings are tied, both names are written.
    assert "lm_head.weight" in written(out)
    with_config = tmp_path / "with-config"
    proc = run_cli(
        "split", str(bare), "-o", str(with_config), "-q", "--config", str(training_checkpoints / "fsdp")
    )
    assert proc.returncode == 0, proc.stderr
    assert (with_config / "config.json").read_bytes() == (
        training_checkpoints / "fsdp" / "config.json"
    ).read_bytes()
    assert "lm_head.weight" not in written(with_config)


def test_config_from_a_hub_repo_id(training_checkpoints, tmp_path):
    from test_hub_source import build_cache

    bare = tmp_path / "step-2"
    shutil.copytree(training_checkpoints / CHECKPOINTS["fsdp2"], bare)
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/tiny-llama", {"config.json": training_checkpoints / "fsdp" / "config.json"})
    out = tmp_path / "out"
    proc = run_cli(
        "split",
        str(bare),
        "-o",
        str(out),
        "-q",
        "--config",
        "acme/tiny-llama",
        env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").read_bytes() == (training_checkpoints / "fsdp" / "config.json").read_bytes()


def test_tag_selects_a_deepspeed_tag(training_checkpoints, tmp_path):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(training_checkpoints / CHECKPOINTS["zero1"], folder)
    (folder / "latest").write_text("global_step7")  # latest names a tag that is not there
    out = tmp_path / "out"
    proc = run_cli("split", str(folder), "-o", str(out), "-q")
    assert proc.returncode == 1 and "global_step7" in proc.stderr and "--tag" in proc.stderr
    proc = run_cli("split", str(folder), "-o", str(out), "-q", "--tag", "global_step2")
    assert proc.returncode == 0, proc.stderr
    assert set(written(out)) == set(reference_state_dict(training_checkpoints, "zero1")) - {"lm_head.weight"}
    # The tag folder itself is a source too.
    proc = run_cli(
        "split", str(folder / "global_step2"), "-o", str(tmp_path / "tag"), "-q", "--config", str(folder)
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tag" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_pipeline_parallel_straight_from_a_training_checkpoint(training_checkpoints, tmp_path, name):
    """``split --pp`` reads the training checkpoint's extents like ``split`` does, with
    ``--config`` where the checkpoint has none beside it: merging the stage folders gives
    back the stack's own consolidation exactly. (``--tp`` takes the same path; the tiny
    model's 101-token vocabulary divides by no degree above 1, on purpose.)"""
    how = ["--pp", "2"]
    source = training_checkpoints / CHECKPOINTS[name]
    config = (
        [] if name.startswith("zero") else ["--config", str(config_folder_of(training_checkpoints, name))]
    )
    parallel, merged = tmp_path / "parallel", tmp_path / "merged"
    proc = run_cli("split", str(source), "-o", str(parallel), *how, *config, "-q")
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p.name for p in parallel.iterdir() if p.is_dir())
    assert folders == ["stage-0", "stage-1"]
    assert all((parallel / f / "config.json").is_file() for f in folders)
    proc = run_cli("merge", str(parallel), "-o", str(merged), "-q")
    assert proc.returncode == 0, proc.stderr
    reference = reference_state_dict(training_checkpoints, name)
    got = written(merged)
    assert set(got) <= set(reference) and set(reference) - set(got) <= {"lm_head.weight"}
    for key, value in got.items():
        assert torch.equal(value, reference[key]), key
