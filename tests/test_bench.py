"""reshard bench: the figures mean what they say, on real files in real child processes.

Each trial starts a fresh Python that imports torch (~2 s), so these tests use tiny
checkpoints and one or two repeats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from reshard.bench.loaders import checksum, proc_read_bytes
from reshard.bench.measure import evict, make_side, plan_trials, run_trial, summarize_values, verdict

N_BYTES = 48 * 2**20  # big enough to stand out from interpreter noise, quick to read


def _state_dict(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # 12 x 4 MiB bf16 tensors plus a 0-dim one: names in a Mistral-like pattern.
    sd = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
        for i in range(12)
    }
    sd["model.scale"] = torch.tensor(1.5)
    return sd


def _nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The same tensors as a .bin (torch.save) and as .safetensors (reference writer)."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bench")
    sd = _state_dict()
    (root / "bin").mkdir()
    (root / "st").mkdir()
    torch.save(sd, root / "bin" / "pytorch_model.bin")
    save_file(sd, str(root / "st" / "model.safetensors"), metadata={"format": "pt"})
    return root / "bin", root / "st", sd


def test_state_dict_loader_peak_memory_covers_the_whole_checkpoint(pair):
    _, st, sd = pair
    n = _nbytes(sd)
    assert n > N_BYTES
    trial = run_trial(make_side("after", st), "safetensors", "warm")
    assert trial["tensors"] == len(sd)
    assert trial["tensor_bytes"] == n
    # The kernel's high-water mark includes the interpreter; what the load added is >= N.
    assert trial["peak_rss"] - trial["baseline_rss"] >= n
    assert trial["peak_rss"] >= trial["end_rss"] >= trial["baseline_rss"]
    assert trial["peak_anon"] >= trial["baseline_anon"] > 0


def test_bin_and_safetensors_loaders_see_the_same_bytes(pair):
    from safetensors.torch import load_file

    bin_dir, st, sd = pair
    n = _nbytes(sd)
    before = run_trial(make_side("before", bin_dir), "torch", "warm")
    mapped = run_trial(make_side("before", bin_dir), "torch-mmap", "warm")
    after = run_trial(make_side("after", st), "torch", "warm")
    expected = sum(checksum(t) for t in load_file(str(st / "model.safetensors")).values())
    assert before["checksum"] == mapped["checksum"] == after["checksum"] == expected
    assert before["tensor_bytes"] == after["tensor_bytes"] == n
    # torch.load without mmap copies every storage into anonymous memory: the sampled
    # anonymous peak must see all N bytes. With mmap the pages are file-backed instead.
    assert before["peak_anon"] - before["baseline_anon"] >= n
    assert mapped["peak_anon"] - mapped["baseline_anon"] < n / 2
    assert mapped["peak_rss"] - mapped["baseline_rss"] >= n


def test_cold_trial_reads_the_file_from_disk_and_warm_does_not(pair):
    _, st, sd = pair
    side = make_side("after", st)
    size = side.weight_bytes
    cold = run_trial(side, "torch", "cold")
    warm = run_trial(side, "torch", "warm")
    if proc_read_bytes() is None:
        # No task I/O accounting on this kernel: the figure must say "unknown", not 0.
        assert cold["read_bytes"] is None and warm["read_bytes"] is None
        return
    assert 0.9 * size <= cold["read_bytes"] <= 1.5 * size
    assert warm["read_bytes"] < 0.1 * size


def test_evict_drops_pages_this_process_reads_back(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x01" * (8 * 2**20))
    path.read_bytes()
    if proc_read_bytes() is None:
        evict([path])  # still must not fail
        return
    evict([path])
    before = proc_read_bytes()
    path.read_bytes()
    assert proc_read_bytes() - before >= 8 * 2**20 * 0.9


def test_trials_alternate_sides_and_skip_what_a_loader_cannot_read(pair):
    bin_dir, st, _ = pair
    before, after = make_side("before", bin_dir), make_side("after", st)
    trials, skipped = plan_trials(before, after, ["safetensors", "torch"], ["cold"], 2)
    order = [(s.label, loader) for s, loader, _, _ in trials]
    assert order == [
        ("after", "safetensors"),
        ("before", "torch"),
        ("after", "torch"),
        ("after", "safetensors"),
        ("after", "torch"),
        ("before", "torch"),
    ]
    assert skipped == {"before/safetensors": "safetensors cannot read .bin files"}


def test_verdict_says_too_noisy_when_the_spread_is_larger_than_the_difference():
    noisy_b, noisy_a = summarize_values([1.0, 3.0, 2.0]), summarize_values([1.5, 2.5, 1.8])
    assert verdict("load_s", noisy_b, noisy_a) == "too noisy to tell"
    clear_b, clear_a = summarize_values([4.0, 4.1, 4.2]), summarize_values([2.0, 2.1, 2.2])
    assert verdict("load_s", clear_b, clear_a) == "after is faster"
    assert verdict("peak_rss", clear_a, clear_b) == "after uses more"
    # Wide but disjoint ranges: every after trial was slower than every before trial.
    assert (
        verdict("load_s", summarize_values([0.17, 0.18, 0.24]), summarize_values([0.54, 0.71, 1.07]))
        == "after is slower"
    )
    assert verdict("load_s", summarize_values([1.0]), summarize_values([2.0])) == "one trial: spread unknown"
    assert verdict("load_s", None, clear_a) == "n/a"
    assert (
        verdict("peak_anon", summarize_values([100.0, 100.0]), summarize_values([100.5, 100.5]))
        == "about the same"
    )


def test_cli_reshards_one_source_and_reports_every_trial_as_json_and_png(pair, tmp_path):
    _, st, sd = pair
    png = tmp_path / "bench.png"
    proc = run_cli(
        "bench",
        str(st),
        "--max-shard",
        "20MB",
        "--loader",
        "torch",
        "--cache",
        "cold",
        "--repeats",
        "2",
        "--json",
        "--plot",
        str(png),
        env={"TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["after"]["format"] == "safetensors" and len(data["after"]["files"]) == 3
    assert data["settings"]["max_shard_size"] == 20 * 10**6
    trials = data["trials"]
    assert len(trials) == 4  # 2 sides x 1 loader x 1 cache mode x 2 repeats
    assert sorted((t["side"], t["repeat"]) for t in trials) == [
        ("after", 0),
        ("after", 1),
        ("before", 0),
        ("before", 1),
    ]
    for t in trials:
        assert t["loader"] == "torch" and t["cache"] == "cold"
        assert t["tensor_bytes"] == _nbytes(sd) and t["load_s"] > 0 and t["peak_rss"] > 0
    assert len({t["checksum"] for t in trials}) == 1
    assert {r["figure"] for r in data["summary"]} >= {"load_s", "peak_rss", "peak_anon"}
    # The temporary reshard is gone.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
        assert img.size[0] > 300 and img.size[1] > 200


def test_cli_table_and_clear_errors(pair, tmp_path):
    bin_dir, st, _ = pair
    proc = run_cli(
        "bench",
        str(bin_dir),
        str(st),
        "--loader",
        "torch",
        "--cache",
        "warm",
        "--repeats",
        "1",
        env={"COLUMNS": "140"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "warm page cache" in proc.stdout and "load time" in proc.stdout
    assert "one trial: spread unknown" in proc.stdout

    bad = run_cli("bench", str(bin_dir), str(st), "--max-shard", "2GB")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-shard" in bad.stderr
    bad = run_cli("bench", str(bin_dir), str(st), "--loader", "jax")
    assert bad.returncode == 2 and "unknown loader" in bad.stderr
    bad = run_cli("bench", str(bin_dir), str(bin_dir), "--loader", "safetensors", "--cache", "warm")
    assert bad.returncode == 2 and "safetensors cannot read .bin" in bad.stderr


def test_cuda_without_a_gpu_is_one_clear_line(pair):
    import torch

    bin_dir, st, _ = pair
    proc = run_cli("bench", str(bin_dir), str(st), "--device", "cuda", "--loader", "torch")
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert "no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr


def test_transformers_loader_loads_the_model_and_touches_every_weight(tiny_mistral_dir):
    from safetensors import safe_open

    side = make_side("before", tiny_mistral_dir)
    trial = run_trial(side, "transformers", "warm")
    with safe_open(str(tiny_mistral_dir / "model.safetensors"), "pt") as f:
        expected = sum(checksum(f.get_tensor(k)) for k in f.keys())
        names = set(f.keys())
    # state_dict() holds exactly the saved weights (no tied or persistent extras here).
    assert trial["tensors"] == len(names)
    assert trial["checksum"] == expected
    assert trial["first_tensor_s"] is None  # from_pretrained hands back nothing earlier
    assert trial["load_s"] > 0
