"""A real tensor-parallel forward pass for every family: tiny random models made by
transformers (from config, no download), cut by reshard's planner into rank folders, run
by N gloo processes (N = 2 and 4: with 2 KV heads, N = 4 replicates them) that each load
only their rank folder (tests/tp_worker.py). The logits must equal the unsplit model's
in fp32; with ``--expert-parallel`` too for the mixture-of-experts families. A negative
control (Phi-3's fused gate_up cut as plain rows) must not match: the comparison can fail.

The rank folders are written here from the planner's per-rank descriptors, every extent
read from the source file where it points, so the test checks the descriptors the writer
will be given, not a re-slicing with torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_families import FAMILIES, IDS, MOE, SMALL, build_tiny_models

from reshard.formats.registry import load_checkpoint
from reshard.hub.resolve import resolve_local
from reshard.parallel.families import family_for
from reshard.parallel.modelconfig import ModelShape, read_config
from reshard.parallel.tensor import Cut, Segment, merged_tensor, plan_tensor_parallel, rank_tensor

REPO = Path(__file__).resolve().parent.parent


def rank_config(model_type: str, n: int, expert_parallel: bool) -> dict:
    """The per-rank counts a tensor-parallel runtime builds its modules with."""
    cfg = {**SMALL, **FAMILIES[model_type]}
    out = {
        "num_attention_heads": cfg["num_attention_heads"] // n,
        "num_key_value_heads": max(1, cfg["num_key_value_heads"] // n),
        "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"] // n,
        "intermediate_size": cfg["intermediate_size"] // n,
    }
    if model_type in ("mixtral", "gpt_oss") and expert_parallel:
        out["intermediate_size"] = cfg["intermediate_size"]  # the experts' width: whole
    if "moe_intermediate_size" in cfg and not expert_parallel:
        out["moe_intermediate_size"] = cfg["moe_intermediate_size"] // n
    if model_type == "deepseek_v3" and expert_parallel:
        out["n_shared_experts"] = cfg["n_shared_experts"] // n  # shared experts stay split
    return out


def materialize(t) -> bytes:
    """A descriptor's stored bytes, read extent by extent, row by row, with plain file
    reads (independent of reshard's writer, which these descriptors are made for)."""
    out = bytearray(t.stored_nbytes)
    handles = {}
    try:
        for e in t.extents:
            f = handles.setdefault(e.source, open(e.source.path, "rb"))
            for src, dest, length in e.row_ranges():
                f.seek(src)
                out[dest : dest + length] = f.read(length)
    finally:
        for f in handles.values():
            f.close()
    t.check_extents()
    return bytes(out)


def write_split(
    src: Path, out: Path, n: int, expert_parallel: bool = False, cut_gate_up_as_rows: bool = False
) -> Path:
    """Rank folders as ``split --tp`` will write them, from the planner's output."""
    import torch
    from safetensors.torch import save_file

    config = read_config(src / "config.json")
    family = family_for(config)
    shape = ModelShape.from_config(config, family=family)
    checkpoint = load_checkpoint(resolve_local(src))
    plan = plan_tensor_parallel(checkpoint.tensors, family, shape, n, expert_parallel)
    cuts = list(plan.cuts)
    if cut_gate_up_as_rows:  # the negative control: contiguous row blocks, same shapes
        cuts = [
            Cut(c.name, "column", c.dtype, c.shape, n, 0, (Segment(c.shape[0], n, 1),), c.ranks)
            if c.kind == "gate_up"
            else c
            for c in cuts
        ]
    for r in range(n):
        folder = out / f"rank-{r}"
        folder.mkdir(parents=True)
        tensors = {}
        for cut in cuts:
            if not cut.holds(r):
                continue
            assert plan.full[cut.name].dtype == "F32"
            data = materialize(rank_tensor(plan.full[cut.name], cut, r))
            tensors[cut.name] = (
                torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(cut.rank_shape).clone()
            )
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text((src / "config.json").read_text())
    (out / "tp_plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    return build_tiny_models(tmp_path_factory.mktemp("families"))


def run_ranks(models: dict, root: Path, degrees=(2, 4)) -> dict:
    """One torchrun launch of max(degrees) processes for every job; (N, job name) ->
    logits, or the error the job raised."""
    import torch

    jobs = []
    for n in degrees:
        for model_type, (folder, _) in models.items():
            for ep in [False, True] if model_type in MOE else [False]:
                name = f"{model_type}{'-ep' if ep else ''}"
                split = write_split(folder, root / f"tp{n}" / name, n, expert_parallel=ep)
                jobs.append(
                    {
                        "n": n,
                        "name": name,
                        "split": str(split),
                        "expert_parallel": ep,
                        "rank_config": rank_config(model_type, n, ep),
                        "ids": IDS,
                        "out": str(root / f"tp{n}-{name}.pt"),
                        "scratch": str(root / "scratch" / f"tp{n}-{name}"),
                    }
                )
        wrong = write_split(models["phi3"][0], root / f"tp{n}" / "phi3-wrong", n, cut_gate_up_as_rows=True)
        jobs.append(
            {
                "n": n,
                "name": "phi3-wrong",
                "split": str(wrong),
                "rank_config": rank_config("phi3", n, False),
                "ids": IDS,
                "out": str(root / f"tp{n}-phi3-wrong.pt"),
                "scratch": str(root / "scratch" / f"tp{n}-wrong"),
            }
        )
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"jobs": jobs}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={max(degrees)}",
            str(REPO / "tests" / "tp_worker.py"),
            str(manifest),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = {}
    for job in jobs:
        error = Path(job["out"] + ".error")
        out[job["n"], job["name"]] = error.read_text() if error.exists() else torch.load(job["out"])
    return out


def test_every_family_tensor_parallel_logits_match(tiny_models, tmp_path_factory):
    """All families, their expert-parallel variants and the negative control, for N = 2
    and N = 4, in one launch; the assertion names every job that differs."""
    import torch

    results = run_ranks(tiny_models, tmp_path_factory.mktemp("tp"))
    names = set(FAMILIES) | {f"{m}-ep" for m in MOE}
    assert set(results) == {(n, name) for n in (2, 4) for name in names | {"phi3-wrong"}}
    bad = {}
    for (n, name), got in results.items():
        if name == "phi3-wrong":
            continue
        want = tiny_models[name.removesuffix("-ep")][1]
        if isinstance(got, str):
            bad[f"N={n} {name}"] = got
        elif got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=1e-4):
            bad[f"N={n} {name}"] = (
                f"max |diff| {(got - want).abs().max().item()}"
                if got.shape == want.shape
                else f"shape {tuple(got.shape)}"
            )
    assert not bad, bad
    for n in (2, 4):  # a wrong cut is caught: the comparison can fail
        wrong = results[n, "phi3-wrong"]
        assert not isinstance(wrong, str), wrong
        assert (wrong - tiny_models["phi3"][1]).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_merge_records_rebuild_every_tensor(tiny_models, tmp_path, model_type):
    """tp_plan.json alone (no family table) rebuilds each full tensor from the rank files,
    bit for bit, for N = 4 (replicated KV heads) and, for MoE, expert placement."""
    from safetensors import safe_open

    folder = tiny_models[model_type][0]
    source = {t.name: t for t in load_checkpoint(resolve_local(folder)).tensors}
    for ep in [False, True] if model_type in MOE else [False]:
        out = write_split(folder, tmp_path / f"ep{ep}", 4, expert_parallel=ep)
        plan = json.loads((out / "tp_plan.json").read_text())
        assert plan["tp"] == 4 and plan["expert_parallel"] == ep
        ranks = [
            {t.name: t for t in load_checkpoint(resolve_local(out / f"rank-{r}")).tensors} for r in range(4)
        ]
        for name, record in plan["tensors"].items():
            assert set(record) >= {"split", "dim", "segments", "ranks", "shape", "rank_shape"}
            cut = Cut.from_json(name, record, 4)
            pieces = {r: ranks[r][name] for r in cut.ranks}
            assert all(ranks[r].get(name) is None for r in set(range(4)) - set(cut.ranks))
            merged = merged_tensor(name, record, 4, pieces)  # what merge will write
            with safe_open(str(source[name].file), "numpy") as f:
                assert materialize(merged) == f.get_tensor(name).tobytes(), name


def load_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_split_writes_the_proven_pieces_and_merge_restores_them(tiny_models, tmp_path, model_type):
    """``split --tp 4`` (and ``--expert-parallel``) writes, rank by rank, exactly the pieces
    the forward-pass test ran on; ``merge`` gives back the source bit for bit."""
    from reshard.parallel.merge import merge_parallel
    from reshard.parallel.split_parallel import split_parallel

    folder = tiny_models[model_type][0]
    source = load_folder(folder)
    for ep in [False, True] if model_type in MOE else [False]:
        proven = write_split(folder, tmp_path / f"proven-{ep}", 4, expert_parallel=ep)
        out = split_parallel(
            str(folder), tmp_path / f"tp-{ep}", tp=4, max_shard_size=20_000, expert_parallel=ep
        ).output
        for r in range(4):
            written, want = load_folder(out / f"rank-{r}"), load_folder(proven / f"rank-{r}")
            assert written.keys() == want.keys(), r
            assert all(written[k].equal(want[k]) for k in want), r
        merged = merge_parallel(out, tmp_path / f"merged-{ep}").output
        back = load_folder(merged)
        assert back.keys() == source.keys() and all(back[k].equal(source[k]) for k in source)


def test_cli_split_bf16_with_replicated_kv_heads_and_experts_then_merge(tiny_models, tmp_path):
    """Through the CLI: a cast, 4 ranks over 2 KV heads, experts placed whole; the plan
    records the written dtype, and merge + verify agree with a plain bf16 split."""
    from conftest import run_cli

    folder = tiny_models["mixtral"][0]
    for args in (
        [
            "split",
            str(folder),
            "-o",
            str(tmp_path / "tp"),
            "--tp",
            "4",
            "--expert-parallel",
            "--dtype",
            "bf16",
            "-q",
        ],
        ["merge", str(tmp_path / "tp"), "-o", str(tmp_path / "merged"), "-q"],
        ["split", str(folder), "-o", str(tmp_path / "bf16"), "--dtype", "bf16", "-q"],
        ["verify", str(tmp_path / "merged"), "--against", str(tmp_path / "bf16")],
    ):
        result = run_cli(*args)
        assert result.returncode == 0, (args[0], result.stderr)
    plan = json.loads((tmp_path / "tp" / "tp_plan.json").read_text())
    assert plan["version"] == 2 and plan["expert_parallel"] is True
    assert {r["dtype"] for r in plan["tensors"].values()} == {"BF16"}
    expert = plan["tensors"]["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    assert (expert["split"], expert["ranks"]) == ("expert", [2])
    k_proj = plan["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert [(s["parts"], s["replicas"]) for s in k_proj["segments"]] == [(2, 2)]
