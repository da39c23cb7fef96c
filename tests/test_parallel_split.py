"""`reshard split --tp N / --pp N` and `reshard merge`, on a real tiny Mistral saved by
transformers: round trips bit for bit, per-rank slices that compute the right partial
sums, and a device map transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import logits_of, make_tiny_mistral, read_json, run_cli

from reshard.formats.registry import load_checkpoint
from reshard.hub.resolve import resolve_local
from reshard.run.verify import read_output, verify_folder

# Head counts that divide by 4 (8 query heads, 4 KV heads, head_dim 8) and 4 layers,
# so --tp 4 and --pp 4 both apply.
TINY_TP = dict(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
LIMIT = 40_000  # bytes per shard: several shards per rank/stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-tp") / "model", seed=3, **TINY_TP)


@pytest.fixture(scope="module")
def source(tiny):
    return load_checkpoint(resolve_local(tiny))


def load_folder(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, loaded by the reference safetensors reader."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def split(tiny, out, *args):
    result = run_cli("split", str(tiny), "-o", str(out), "--max-shard", str(LIMIT), "-q", *args)
    assert result.returncode == 0, result.stderr
    return out


def check_rank_folder(folder: Path) -> dict:
    """A valid sharded checkpoint: index + shards agree, shards respect the limit,
    config copied."""
    written = read_output(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert (folder / "config.json").is_file()
    weight_map = read_json(folder / "model.safetensors.index.json")["weight_map"]
    for file_name in set(weight_map.values()):
        in_file = [t for t in written.values() if t.file.name == file_name]
        assert sum(t.nbytes for t in in_file) <= LIMIT or len(in_file) == 1
    return written


@pytest.mark.parametrize("n", [2, 4])
def test_tp_split_then_merge_is_bit_for_bit(tiny, source, tmp_path, n):
    out = split(tiny, tmp_path / "tp", "--tp", str(n))
    assert sorted(p.name for p in out.iterdir()) == [f"rank-{r}" for r in range(n)] + ["tp_plan.json"]
    plan = read_json(out / "tp_plan.json")["tensors"]
    assert set(plan) == {t.name for t in source.tensors}
    expect = {
        "self_attn.q_proj.weight": ("column", 0),
        "self_attn.k_proj.weight": ("column", 0),
        "self_attn.o_proj.weight": ("row", 1),
        "mlp.up_proj.weight": ("column", 0),
        "mlp.down_proj.weight": ("row", 1),
        "input_layernorm.weight": ("replicated", None),
    }
    for suffix, (kind, dim) in expect.items():
        assert (plan[f"model.layers.2.{suffix}"]["split"], plan[f"model.layers.2.{suffix}"]["dim"]) == (
            kind,
            dim,
        )
    assert plan["model.embed_tokens.weight"]["split"] == plan["lm_head.weight"]["split"] == "vocab"
    full = load_folder(tiny)
    for r in range(n):
        written = check_rank_folder(out / f"rank-{r}")
        rank = load_folder(out / f"rank-{r}")
        assert set(rank) == set(full)
        for name, spec in plan.items():
            assert list(written[name].shape) == spec["rank_shape"]
            want = full[name] if spec["dim"] is None else full[name].chunk(n, dim=spec["dim"])[r]
            assert rank[name].equal(want), name
    merged = tmp_path / "merged"
    result = run_cli("merge", str(out), "-o", str(merged), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["strategy"] == "tensor"
    report = verify_folder(merged, source)  # every byte compared with the source
    assert report.compared_bytes == source.total_size and report.tensors == len(source.tensors)
    assert (merged / "config.json").read_bytes() == (tiny / "config.json").read_bytes()


@pytest.mark.parametrize("n", [2, 4])
def test_pp_split_then_merge_is_bit_for_bit(tiny, source, tmp_path, n):
    out = split(tiny, tmp_path / "pp", "--pp", str(n))
    plan = read_json(out / "pp_plan.json")
    stages = plan["stages"]
    assert [s["folder"] for s in stages] == [f"stage-{i}" for i in range(n)]
    assert sum((s["layers"] for s in stages), []) == list(range(4))
    written = [check_rank_folder(out / s["folder"]) for s in stages]
    assert "model.embed_tokens.weight" in written[0]
    assert {"model.norm.weight", "lm_head.weight"} <= set(written[-1])
    for s, tensors in zip(stages, written):
        layers = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
        assert layers == set(s["layers"])
        assert s["size"] == sum(t.nbytes for t in tensors.values())
    merged = tmp_path / "merged"
    result = run_cli("merge", str(out), "-o", str(merged), "--max-shard", "100KB")
    assert result.returncode == 0, result.stderr
    report = verify_folder(merged, source)
    assert report.compared_bytes == source.total_size and len(report.files) > 1


def test_tp_merge_in_small_chunks_and_from_strided_ranks(tiny, source, tmp_path, monkeypatch):
    """A tiny chunk forces the row-interleaving path through many blocks."""
    from reshard.parallel import merge
    from reshard.parallel.split_parallel import split_parallel
    from reshard.transfer import cast

    out = split_parallel(str(tiny), tmp_path / "tp", tp=4, max_shard_size=LIMIT).output
    monkeypatch.setattr(cast, "CONVERT_CHUNK", 100)
    merge.merge_parallel(out, tmp_path / "merged")
    assert verify_folder(tmp_path / "merged", source).compared_bytes == source.total_size


@pytest.mark.parametrize("n", [2, 4])
def test_rank_slices_sum_to_the_full_layer(tiny, tmp_path, n):
    """The all-reduce: each rank's attention and MLP partial outputs, computed from its
    own slices only, add up to the full layer's output."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb, repeat_kv

    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    cfg = model.config
    out = split(tiny, tmp_path / "tp", "--tp", str(n))
    ranks = [load_folder(out / f"rank-{r}") for r in range(n)]
    torch.manual_seed(0)
    x = torch.randn(2, 7, cfg.hidden_size)
    positions = torch.arange(7).unsqueeze(0).expand(2, -1)
    cos, sin = model.model.rotary_emb(x, positions)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    p = "model.layers.1"
    layer = model.model.layers[1]
    with torch.no_grad():
        full_attn = layer.self_attn(x, (cos, sin), mask)[0]
        full_mlp = layer.mlp(x)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    heads, kv_heads = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
    attn_parts, mlp_parts = [], []
    for w in ranks:
        q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).view(2, 7, heads, head_dim).transpose(1, 2)
        k = (x @ w[f"{p}.self_attn.k_proj.weight"].T).view(2, 7, kv_heads, head_dim).transpose(1, 2)
        v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).view(2, 7, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
        scores = torch.softmax(q @ k.transpose(2, 3) * head_dim**-0.5 + mask, dim=-1)
        context = (scores @ v).transpose(1, 2).reshape(2, 7, heads * head_dim)
        attn_parts.append(context @ w[f"{p}.self_attn.o_proj.weight"].T)
        gate = torch.nn.functional.silu(x @ w[f"{p}.mlp.gate_proj.weight"].T)
        mlp_parts.append((gate * (x @ w[f"{p}.mlp.up_proj.weight"].T)) @ w[f"{p}.mlp.down_proj.weight"].T)
    assert attn_parts[0].shape == full_attn.shape
    # Each part alone is far from the whole (the test could fail), the sum matches.
    assert not torch.allclose(attn_parts[0], full_attn, atol=1e-3)
    torch.testing.assert_close(sum(attn_parts), full_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(mlp_parts), full_mlp, rtol=1e-5, atol=1e-6)
    # Vocab-parallel head: each rank's logits are a slice; concatenated they are the whole.
    hidden = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(
        torch.cat([hidden @ w["lm_head.weight"].T for w in ranks], dim=-1),
        model.lm_head(hidden).detach(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_device_map_loads_with_transformers_and_gives_same_logits(tiny, tmp_path):
    map_file = tmp_path / "device_map.json"
    result = run_cli("plan", str(tiny), "--gpus", "2", "--device-map", str(map_file), "--json")
    assert result.returncode == 0, result.stderr
    mapping = json.loads(map_file.read_text())
    stages = [g["layers"] for g in json.loads(result.stdout)["per_gpu"]]
    assert [mapping[f"model.layers.{i}"] for i in range(4)] == [
        s for s, layers in enumerate(stages) for _ in layers
    ]
    assert set(mapping.values()) == {0, 1}
    import torch
    from transformers import AutoModelForCausalLM

    want = logits_of(tiny)
    on_cpu = {module: "cpu" for module in mapping}  # every stage on the CPU for the test
    got = logits_of(tiny, device_map=on_cpu)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    # transformers does not insist that a map covers every module: check it ourselves.
    model = AutoModelForCausalLM.from_pretrained(tiny)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert all(any(n.startswith(m + ".") for m in mapping) for n in names)
    # Proof the map is honoured: stage 1 offloaded to disk by accelerate, stage 0 on CPU;
    # accelerate moves hidden states and weights between them, logits do not change.
    split_map = {m: "cpu" if d == 0 else "disk" for m, d in mapping.items()}
    model = AutoModelForCausalLM.from_pretrained(
        tiny, device_map=split_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    devices = {n.rsplit(".", 1)[0]: p.device.type for n, p in model.named_parameters()}
    assert devices["model.embed_tokens"] == "cpu" and devices["lm_head"] == "meta"  # offloaded
    with torch.no_grad():
        ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
        assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "3"], "8 attention heads do not divide by 3 GPUs"),
        (["--tp", "16"], "8 attention heads do not divide by 16 GPUs"),  # 8 KV-replicated ranks work
        (["--pp", "5"], "5 pipeline stages but the model has only 4 layers"),
        (["--tp", "2", "--pp", "2"], "pass exactly one of --tp N or --pp N"),
        (["--tp", "0"], "must be at least 1"),
        (["--tp", "2", "--dry-run"], "--dry-run does not apply with --tp/--pp"),
    ],
)
def test_split_parallel_errors_are_one_line_and_write_nothing(tiny, tmp_path, args, message):
    result = run_cli("split", str(tiny), "-o", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_folder_without_a_plan(tiny, tmp_path):
    result = run_cli("merge", str(tiny), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "neither tp_plan.json nor pp_plan.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_merge_names_a_rank_that_disagrees_with_the_plan(tiny, tmp_path):
    out = split(tiny, tmp_path / "tp", "--tp", "2")
    plan_path = out / "tp_plan.json"
    plan = read_json(plan_path)
    plan["tensors"]["model.norm.weight"]["shape"] = [999]
    plan_path.write_text(json.dumps(plan))
    result = run_cli("merge", str(out), "-o", str(tmp_path / "merged"))
    assert result.returncode == 1
    assert "model.norm.weight" in result.stderr and "rank-0" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_tp_split_of_a_bin_with_strided_views(tiny, tmp_path):
    """A .bin whose tensors are non-contiguous views (a transpose, a stepped slice): the
    rank slices are views of views, and merge still gives back the exact tensors."""
    import shutil

    import torch

    from reshard.parallel.merge import merge_parallel
    from reshard.parallel.split_parallel import split_parallel

    state = load_folder(tiny)
    torch.manual_seed(1)
    down = "model.layers.0.mlp.down_proj.weight"  # row-parallel: split along dim 1
    up = "model.layers.0.mlp.up_proj.weight"  # column-parallel: split along dim 0
    state[down] = torch.randn(state[down].shape[::-1]).t()  # strides (1, rows)
    state[up] = torch.randn(2 * state[up].shape[0], state[up].shape[1])[::2]
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    shutil.copy(tiny / "config.json", src)
    described = {t.name: t for t in load_checkpoint(resolve_local(src)).tensors}
    assert described[down].strides is not None and described[up].strides is not None
    out = split_parallel(str(src), tmp_path / "tp", tp=2).output
    for r in range(2):
        rank = load_folder(out / f"rank-{r}")
        assert rank[down].equal(state[down].chunk(2, dim=1)[r])
        assert rank[up].equal(state[up].chunk(2, dim=0)[r])
    merge_parallel(out, tmp_path / "merged")
    merged = load_folder(tmp_path / "merged")
    assert merged.keys() == state.keys()
    assert all(merged[name].equal(state[name]) for name in state)
