"""`reshard plan`: pipeline balancing, tensor-parallel sizes and memory estimates, checked
against numbers worked out by hand for Mistral-7B's real config (header-only checkpoint:
a real safetensors header over a sparse file, so no 14 GB are written)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

from reshard.demo import MISTRAL_7B_CONFIG, mistral_tensors
from reshard.errors import UsageError
from reshard.formats.safetensors import build_header
from reshard.parallel.devicemap import device_map
from reshard.parallel.families import LLAMA
from reshard.parallel.pipeline import balance_layers, plan_pipeline
from reshard.units import dtype_nbytes

# ---- Mistral-7B by hand (bf16: 2 bytes per parameter) ---------------------------------
HIDDEN, INTER, VOCAB, KV_OUT = 4096, 14336, 32000, 8 * 128
NORM = HIDDEN * 2  # one RMSNorm weight: 8,192 bytes
LAYER = 2 * (
    HIDDEN * HIDDEN  # q_proj
    + 2 * KV_OUT * HIDDEN  # k_proj, v_proj
    + HIDDEN * HIDDEN  # o_proj
    + 3 * INTER * HIDDEN  # gate, up, down
    + 2 * HIDDEN
)  # input + post-attention norms
EMBED = VOCAB * HIDDEN * 2  # embed_tokens, and lm_head the same
TOTAL = 32 * LAYER + 2 * EMBED + NORM
REPLICATED = 32 * 2 * NORM + NORM  # the norms every TP rank keeps whole
KV_PER_LAYER = 2 * 1 * 4096 * 8 * 128 * 2  # K and V x batch x context x heads x dim x bytes
ACT = 1 * 4096 * 2 * (2 * HIDDEN + 3 * INTER)  # batch x context x bytes x (2h + 3i)


def test_hand_numbers_are_what_they_claim():
    assert LAYER == 436_224_000
    assert EMBED == 262_144_000
    assert TOTAL == 14_483_464_192
    assert 32 * KV_PER_LAYER == 536_870_912  # the well-known 0.5 GiB at 4k context
    assert ACT == 419_430_400


@pytest.fixture(scope="module")
def mistral_7b(tmp_path_factory):
    """All 32 layers' headers over a sparse data section (a few KB on disk)."""
    folder = tmp_path_factory.mktemp("mistral-7b")
    entries = [(n, "BF16", s, dtype_nbytes("BF16", s)) for n, s in mistral_tensors(32)]
    header = build_header({"format": "pt"}, entries, pad_to=8)
    path = folder / "model.safetensors"
    path.write_bytes(header)
    os.truncate(path, len(header) + sum(e[3] for e in entries))
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    return folder


def plan_json(folder, *args):
    result = run_cli("plan", str(folder), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "gpus, layers, weights",
    [
        (1, [range(0, 32)], [TOTAL]),
        (2, [range(0, 16), range(16, 32)], [EMBED + 16 * LAYER, 16 * LAYER + EMBED + NORM]),
        (
            4,
            [range(0, 8), range(8, 16), range(16, 24), range(24, 32)],
            [EMBED + 8 * LAYER, 8 * LAYER, 8 * LAYER, 8 * LAYER + EMBED + NORM],
        ),
    ],
)
def test_pipeline_plan_matches_hand_computation(mistral_7b, gpus, layers, weights):
    data = plan_json(mistral_7b, "--gpus", str(gpus), "--strategy", "pipeline")
    assert data["model"] == {
        "layers": 32,
        "hidden_size": 4096,
        "attention_heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "sliding_window": 4096,
        "sliding_layers": 32,
    }
    assert data["parameters"] == {"total": TOTAL // 2, "active": TOTAL // 2}
    assert data["dtype"] == "BF16"
    assert [g["layers"] for g in data["per_gpu"]] == [list(r) for r in layers]
    assert [g["weights"] for g in data["per_gpu"]] == weights
    for g, r in zip(data["per_gpu"], layers):
        assert g["kv_cache"] == len(r) * KV_PER_LAYER
        assert g["activations"] == ACT
        assert g["total"] == g["weights"] + g["kv_cache"] + g["activations"]
    assert sum(g["weights"] for g in data["per_gpu"]) == TOTAL


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_tensor_plan_matches_hand_computation(mistral_7b, gpus):
    data = plan_json(mistral_7b, "--gpus", str(gpus), "--strategy", "tensor")
    weights = (TOTAL - REPLICATED) // gpus + REPLICATED
    act = 4096 * 2 * (2 * HIDDEN + 3 * INTER // gpus)
    assert len(data["per_gpu"]) == gpus
    for g in data["per_gpu"]:
        assert (g["weights"], g["kv_cache"], g["activations"]) == (weights, 32 * KV_PER_LAYER // gpus, act)
    if gpus == 4:
        assert weights == 3_621_265_408 and act == 155_189_248


def test_context_batch_and_dtype_scale_the_cache(mistral_7b):
    data = plan_json(mistral_7b, "--gpus", "2", "--context", "32768", "--batch", "4", "--dtype", "fp32")
    g = data["per_gpu"][0]
    assert data["dtype"] == "F32"
    assert g["weights"] == 2 * (EMBED + 16 * LAYER)  # bf16 -> fp32 doubles the weights
    # Mistral v0.1's 4096-token window on every layer: 4096 tokens cached, not 32768.
    assert g["kv_cache"] == 2 * 4 * 4096 * 8 * 128 * 4 * 16  # 2 GiB for 16 layers, not 16 GiB
    assert g["activations"] == 4 * 32768 * 4 * (2 * HIDDEN + 3 * INTER)


def test_gpu_memory_verdict_and_fewest_gpus(mistral_7b):
    # 3 stages: some stage holds >= TOTAL / 3 = 4.83 GB of weights, + 0.42 GB activations,
    # + the 1 GB headroom; 4 stages: 4.31 GB + 1 GB.
    assert TOTAL / 3 + ACT + 1e9 > 6e9
    assert (EMBED + 8 * LAYER + NORM) + 8 * KV_PER_LAYER + ACT + 1e9 <= 6e9
    data = plan_json(mistral_7b, "--gpus", "2", "--gpu-memory", "6GB")
    assert (data["fits"], data["min_gpus"], data["gpu_memory"], data["headroom"]) == (
        False,
        4,
        6 * 10**9,
        10**9,
    )
    # Without headroom 4 stages fit in 5 GB, as the bare figures say.
    data = plan_json(mistral_7b, "--gpus", "2", "--gpu-memory", "5GB", "--headroom", "0")
    assert (data["fits"], data["min_gpus"], data["headroom"]) == (False, 4, 0)
    data = plan_json(mistral_7b, "--gpus", "1", "--gpu-memory", "80GB")
    assert (data["fits"], data["min_gpus"]) == (True, 1)
    # Tensor parallel: 2 ranks hold 7.24 GB each, 3 do not divide 32 heads; 4 ranks 3.91 GB.
    data = plan_json(mistral_7b, "--gpus", "8", "--strategy", "tensor", "--gpu-memory", "5GB")
    assert (data["fits"], data["min_gpus"]) == (True, 4)


def test_headroom_decides_a_close_fit(mistral_7b):
    """Issue 18.15: 7.93 GB on each of 2 GPUs is not a fit for 8 GB GPUs once the CUDA
    context and allocator are counted; the table says what it added."""
    per_gpu = EMBED + 16 * LAYER + 16 * KV_PER_LAYER + ACT
    assert 7.9e9 < per_gpu < 8e9 < per_gpu + 1e9
    result = run_cli("plan", str(mistral_7b), "--gpus", "2", "--gpu-memory", "8GB")
    assert result.returncode == 0, result.stderr
    assert "does NOT fit in 8.00 GB per GPU" in result.stdout
    assert "7.93 GB + 1.00 GB headroom" in " ".join(result.stdout.split())
    data = plan_json(mistral_7b, "--gpus", "2", "--gpu-memory", "8GB", "--headroom", "0")
    assert data["fits"] is True
    data = plan_json(mistral_7b, "--gpus", "2", "--gpu-memory", "8GB", "--headroom", "500MB")
    assert (data["fits"], data["headroom"]) == (False, 500 * 10**6)


def test_sixteen_tensor_parallel_ranks_replicate_kv_heads(mistral_7b):
    """8 KV heads over 16 GPUs: each rank holds one KV head (each replicated twice), as
    serving engines do, instead of a refusal."""
    data = plan_json(mistral_7b, "--gpus", "16", "--strategy", "tensor")
    q, kv = 32 // 16 * 128, 1 * 128
    layer = 2 * (q * HIDDEN + 2 * kv * HIDDEN + HIDDEN * q + 3 * (INTER // 16) * HIDDEN + 2 * HIDDEN)
    weights = 32 * layer + 2 * 2 * (VOCAB // 16) * HIDDEN + NORM
    assert {g["weights"] for g in data["per_gpu"]} == {weights}
    assert {g["kv_cache"] for g in data["per_gpu"]} == {32 * 2 * 1 * 4096 * 1 * 128 * 2}


def test_plan_table_and_device_map_file(mistral_7b, tmp_path):
    out = tmp_path / "map.json"
    result = run_cli("plan", str(mistral_7b), "--gpus", "4", "--gpu-memory", "80GB", "--device-map", str(out))
    assert result.returncode == 0, result.stderr
    assert "layers 8-15" in result.stdout and "fits in 80.00 GB" in result.stdout
    mapping = json.loads(out.read_text())
    assert mapping["model.embed_tokens"] == 0 and mapping["lm_head"] == 3
    assert [mapping[f"model.layers.{i}"] for i in range(32)] == [i // 8 for i in range(32)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "3", "--strategy", "tensor"], "32 attention heads do not divide by 3 GPUs"),
        (["--gpus", "64", "--strategy", "tensor"], "32 attention heads do not divide by 64 GPUs"),
        (
            ["--gpus", "2", "--strategy", "tensor", "--expert-parallel"],
            "--expert-parallel needs a mixture-of-experts model",
        ),
        (["--gpus", "33"], "33 pipeline stages but the model has only 32 layers"),
        (["--gpus", "2", "--strategy", "diagonal"], "unknown --strategy 'diagonal'"),
        (
            ["--gpus", "2", "--strategy", "tensor", "--device-map", "m.json"],
            "--device-map needs --strategy pipeline",
        ),
    ],
)
def test_plan_bad_options_give_one_line(mistral_7b, tmp_path, args, message):
    result = run_cli("plan", str(mistral_7b), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_plan_without_config_names_it(tmp_path, mistral_7b):
    (tmp_path / "m").mkdir()
    os.link(mistral_7b / "model.safetensors", tmp_path / "m" / "model.safetensors")
    result = run_cli("plan", str(tmp_path / "m"), "--gpus", "2")
    assert result.returncode == 1
    assert "config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- pure planner pieces with integer sizes -------------------------------------------
def test_balance_is_by_bytes_not_layer_count():
    assert balance_layers([10] * 8, 2, first=0, last=0) == [4, 4]
    # A 40-byte embedding is worth 4 layers: stage 0 takes fewer layers.
    assert balance_layers([10] * 8, 2, first=40, last=0) == [2, 6]
    assert balance_layers([10] * 8, 2, first=0, last=40) == [6, 2]
    # Uneven layers: the heavy one sits alone.
    assert balance_layers([1, 1, 1, 9, 1, 1], 3, first=0, last=0) == [3, 1, 2]


def test_balance_is_optimal_against_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(1, 9), rng.randint(1, 4)
        if k > n:
            continue
        sizes = [rng.randint(1, 50) for _ in range(n)]
        first, last = rng.randint(0, 80), rng.randint(0, 80)

        def worst(counts):
            bounds = list(itertools.accumulate(counts, initial=0))
            costs = [sum(sizes[bounds[s] : bounds[s + 1]]) for s in range(k)]
            costs[0] += first
            costs[-1] += last
            return max(costs)

        best = min(
            worst([b - a for a, b in zip((0, *cuts), (*cuts, n))])
            for cuts in itertools.combinations(range(1, n), k - 1)
        )
        counts = balance_layers(sizes, k, first, last)
        assert sum(counts) == n and min(counts) >= 1
        assert worst(counts) == best


def test_plan_pipeline_places_embedding_first_and_head_last():
    sizes = [
        ("lm_head.weight", 5),
        ("model.embed_tokens.weight", 5),
        ("model.norm.weight", 1),
        *((f"model.layers.{i}.w", 3) for i in range(4)),
    ]
    plan = plan_pipeline(sizes, LLAMA, 2)
    assert [s.layers for s in plan.stages] == [(0, 1), (2, 3)]
    assert plan.stage_of()["model.embed_tokens.weight"] == 0
    assert plan.stage_of()["lm_head.weight"] == plan.stage_of()["model.norm.weight"] == 1
    assert [s.nbytes for s in plan.stages] == [11, 12]
    assert device_map(plan, LLAMA, ["cpu", "cpu"], tied_embeddings=True)["lm_head"] == "cpu"
    assert device_map(plan, LLAMA, tied_embeddings=True)["lm_head"] == 0
    # A tied head (no lm_head tensor): the last stage counts a copy of the embedding.
    untied = [(n, b) for n, b in sizes if n != "lm_head.weight"]
    tied = plan_pipeline(untied, LLAMA, 2, tied_head=5)
    assert [s.weight_bytes for s in tied.stages] == [11, 12] and tied.stages[1].tied_head == 5
    assert tied.stages[1].describe() == "layers 2-3, norm + head (tied: a copy of the embedding)"


def test_plan_pipeline_rejects_gaps_in_layers():
    with pytest.raises(UsageError, match="layer 1 has no tensors"):
        plan_pipeline([("model.layers.0.w", 1), ("model.layers.2.w", 1)], LLAMA, 1)


def test_plan_of_a_hub_repo_reads_headers_and_config_only(tmp_path):
    """Against the in-process fake Hub: the plan equals the local one, config.json is
    downloaded, and the weights file is only ever asked for by byte range (its header)."""
    import subprocess
    import sys

    from conftest import make_tiny_mistral
    from hubserver import HubServer

    local = make_tiny_mistral(tmp_path / "tiny", num_hidden_layers=4, intermediate_size=4096)
    weights = (local / "model.safetensors").read_bytes()
    assert len(weights) > 1_000_000  # well above the 100,000-byte header read
    with HubServer() as hub:
        hub.state.add_repo(
            "org/tiny", {"model.safetensors": weights, "config.json": (local / "config.json").read_bytes()}
        )
        env = {**os.environ, **hub.env(str(tmp_path / "hf-home"))}
        env.pop("RESHARD_DEBUG", None)
        remote = subprocess.run(
            [sys.executable, "-m", "reshard.cli", "plan", "org/tiny", "--gpus", "2", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert remote.returncode == 0, remote.stderr
        gets = hub.requests("GET", "/resolve/")
    assert any(r.path.endswith("/config.json") for r in gets)
    weight_gets = [r for r in gets if r.path.endswith("model.safetensors")]
    assert weight_gets and all(r.range and r.range.startswith("bytes=0-") for r in weight_gets)
    assert all(int(r.range.split("-")[1]) < 200_000 for r in weight_gets), weight_gets
    assert not list((tmp_path / "hf-home").rglob("model.safetensors"))
    got = json.loads(remote.stdout)
    want = plan_json(local, "--gpus", "2")
    assert got["per_gpu"] == want["per_gpu"] and got["model"] == want["model"]


def test_plan_reads_a_bin_source(tmp_path):
    """Issue 18.15: --help says SOURCE may be a .bin; plan describes it from its pickle
    (no storage read) and gives the same figures as the safetensors copy."""
    import shutil

    import torch
    from conftest import make_tiny_mistral
    from safetensors.torch import load_file

    st = make_tiny_mistral(tmp_path / "st", num_hidden_layers=4)
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(load_file(str(st / "model.safetensors")), binary / "pytorch_model.bin")
    shutil.copy(st / "config.json", binary)
    for args in (["--gpus", "2"], ["--gpus", "2", "--strategy", "tensor"]):
        got, want = plan_json(binary, *args), plan_json(st, *args)
        assert got["per_gpu"] == want["per_gpu"] and got["parameters"] == want["parameters"]


def test_tied_head_table_and_device_map_say_the_same(tmp_path):
    """Issue 18.15: with tied embeddings the table counts the last GPU's copy of the head
    (what a serving engine keeps), and says where the device map puts lm_head instead;
    transformers loads that map and gives the same logits."""
    import torch
    from conftest import logits_of, make_tiny_mistral
    from transformers import AutoModelForCausalLM

    tiny = make_tiny_mistral(tmp_path / "tied", num_hidden_layers=4, tie_word_embeddings=True)
    map_file = tmp_path / "map.json"
    data = plan_json(tiny, "--gpus", "2", "--device-map", str(map_file))
    embed = 256 * 64 * 4
    first, last = data["per_gpu"]
    assert last["holds"] == "layers 2-3, norm + head (tied: a copy of the embedding)"
    layer = (first["weights"] - embed) // 2
    assert last["weights"] == 2 * layer + 64 * 4 + embed  # its layers, the norm, the copy
    mapping = json.loads(map_file.read_text())
    assert mapping["lm_head"] == 0 and mapping["model.layers.3"] == 1
    assert data["notes"] == [
        f"tied head: the device map puts lm_head with the embedding on GPU 0 "
        f"(transformers shares one tensor); with it, GPU 1 needs "
        f"{embed / 1000:.2f} KB less than the table, which counts the copy "
        "a serving engine keeps there"
    ]
    table = run_cli("plan", str(tiny), "--gpus", "2", "--device-map", str(map_file))
    assert "tied head: the device map puts lm_head with the embedding on GPU 0" in " ".join(
        table.stdout.split()
    )
    split_map = {m: "cpu" if d == 0 else "disk" for m, d in mapping.items()}
    model = AutoModelForCausalLM.from_pretrained(
        tiny, device_map=split_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    ids = torch.arange(1, 17).unsqueeze(0) % 256
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_of(tiny))
