"""The Python API (`from reshard import split, inspect, verify, plan, merge, push`).

The CLI calls these functions, so `reshard CMD --json` (a real subprocess) and the API's
`to_json()` must be the same object, less the CLI's `"ok": true`. Each comparison runs the
CLI first, removes what it wrote, then calls the API with the same arguments on the same
paths, so the two dicts compare whole, with no field left out.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli, write_safetensors

import reshard
from reshard.run.events import Progress


def cli_json(*args: str) -> dict:
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data.pop("ok") is True
    return data


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    """Six float32 tensors in two files with an index, as reshard's own split writes them."""
    rng = np.random.default_rng(7)
    raw = tmp_path_factory.mktemp("api-src") / "raw"
    raw.mkdir()
    write_safetensors(
        raw / "model.safetensors",
        {f"model.layers.{i}.w": rng.standard_normal((40, 50)).astype("float32") for i in range(6)},
    )
    (raw / "config.json").write_text('{"model_type": "llama"}')
    source = raw.parent / "source"
    reshard.split(raw, source, max_shard=24_000)
    return source


def test_split_cli_json_equals_api_to_json(sharded_source, tmp_path):
    out = tmp_path / "out"
    args = (str(sharded_source), "-o", str(out), "--max-shard", "20KB", "--checksum")
    from_cli = cli_json("split", *args)
    shutil.rmtree(out)
    result = reshard.split(str(sharded_source), out, max_shard="20KB", checksum=True)
    assert isinstance(result, reshard.SplitResult)
    assert result.to_json() == from_cli
    shard_files = [s["file"] for s in from_cli["shards"]]
    assert len(shard_files) == 3 and set(shard_files) < set(from_cli["sha256"])


def test_split_dry_run_cli_json_equals_api_to_json(sharded_source, tmp_path):
    out = tmp_path / "never-written"
    from_cli = cli_json("split", str(sharded_source), "-o", str(out), "--max-shard", "50KB", "--dry-run")
    result = reshard.split(str(sharded_source), out, max_shard=50_000, dry_run=True)
    assert result.to_json() == from_cli
    assert from_cli["dry_run"] is True and not out.exists()


def test_inspect_cli_json_equals_api_to_json(sharded_source):
    from_cli = cli_json("inspect", str(sharded_source))
    result = reshard.inspect(str(sharded_source))
    assert isinstance(result, reshard.InspectResult)
    assert result.to_json() == from_cli
    assert list(result.to_json()) == list(from_cli)  # same key order as the CLI prints
    assert (result.tensors, result.parameters, result.format) == (6, 6 * 40 * 50, from_cli["format"])
    assert result.warnings == ()


def test_plan_cli_json_equals_api_to_json(tiny_mistral_dir, tmp_path):
    device_map = tmp_path / "device_map.json"
    args = ["--gpus", "2", "--gpu-memory", "1GB", "--headroom", "0", "--context", "256"]
    from_cli = cli_json("plan", str(tiny_mistral_dir), *args, "--device-map", str(device_map))
    written = json.loads(device_map.read_text())
    device_map.unlink()
    result = reshard.plan(
        str(tiny_mistral_dir), 2, gpu_memory="1GB", headroom=0, context=256, device_map=device_map
    )
    assert isinstance(result, reshard.ParallelPlan)
    assert result.to_json() == from_cli
    assert json.loads(device_map.read_text()) == written
    assert from_cli["device_map"] == str(device_map) and from_cli["fits"] is True
    # Without a device map the key is there, as null, in both.
    assert reshard.plan(str(tiny_mistral_dir), 2).to_json() == cli_json(
        "plan", str(tiny_mistral_dir), "--gpus", "2"
    )


def test_verify_cli_json_equals_api_to_json(sharded_source):
    done = run_cli("verify", str(sharded_source), "--against", str(sharded_source), "--json")
    assert done.returncode == 0, done.stderr
    report = reshard.verify(sharded_source, against=sharded_source)
    assert isinstance(report, reshard.VerifyReport)
    assert report.to_json() == json.loads(done.stdout)  # a report's own JSON says "ok": true
    assert report.compared_bytes == report.total_size == 6 * 40 * 50 * 4


def test_tensor_parallel_split_and_merge_cli_json_equal_api(tiny_mistral_dir, tmp_path):
    ranks, merged = tmp_path / "tp2", tmp_path / "merged"
    from_cli = cli_json("split", str(tiny_mistral_dir), "-o", str(ranks), "--tp", "2")
    shutil.rmtree(ranks)
    result = reshard.split(str(tiny_mistral_dir), ranks, tp=2)
    assert isinstance(result, reshard.ParallelSplitResult)
    assert result.to_json() == from_cli
    merged_cli = cli_json("merge", str(ranks), "-o", str(merged), "--max-shard", "100KB")
    shutil.rmtree(merged)
    merge_result = reshard.merge(ranks, merged, max_shard="100KB")
    assert isinstance(merge_result, reshard.MergeResult)
    assert merge_result.to_json() == merged_cli
    reshard.verify(merged, against=str(tiny_mistral_dir))  # the merge is the original again


def test_results_are_frozen(sharded_source):
    result = reshard.inspect(str(sharded_source))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.tensors = 0  # type: ignore[misc]
    data = result.to_json()
    data["shards"].clear()
    assert len(result.to_json()["shards"]) == 2  # to_json() hands out a copy


def test_errors_are_the_cli_errors(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    done = run_cli("split", missing)
    assert done.returncode == 1
    with pytest.raises(reshard.SourceError) as raised:
        reshard.split(missing, tmp_path / "out")
    assert done.stderr.strip() == f"error: {raised.value}"
    assert issubclass(reshard.SourceError, reshard.ReshardError)
    with pytest.raises(reshard.UsageError, match="--expert-parallel needs --tp N"):
        reshard.split(missing, expert_parallel=True)
    with pytest.raises(reshard.UsageError, match="cannot read size '2 gigs'"):
        reshard.split(missing, max_shard="2 gigs")
    with pytest.raises(reshard.UsageError, match="--checksum does nothing here"):
        reshard.split(missing, dry_run=True, checksum=True)
    with pytest.raises(reshard.UsageError, match="--checksum does not apply with --tp/--pp"):
        reshard.split(missing, tp=2, checksum=True)
    with pytest.raises(reshard.UsageError, match="--key does nothing here"):
        reshard.verify(tmp_path, key="module")


class Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin(self, total, shards):
        self.events.append(("begin", total, shards))

    def start_shard(self, number, count, file_name, size):
        self.events.append(("start_shard", number, count, file_name, size))

    def advance(self, nbytes):
        self.events.append(("advance", nbytes))

    def end_shard(self):
        self.events.append(("end_shard",))

    def shard_written(self, file_name):
        self.events.append(("shard_written", file_name))

    def before_publish(self):
        self.events.append(("before_publish",))

    def close(self):
        self.events.append(("close",))


def test_progress_object_gets_every_event_and_one_close(sharded_source, tmp_path):
    recorder = Recorder()
    result = reshard.split(sharded_source, tmp_path / "out", max_shard="20KB", progress=recorder)
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "begin" and kinds[-2:] == ["before_publish", "close"]
    assert kinds.count("close") == 1
    assert recorder.events[0][1:] == (result.plan.total_size, 3)
    written = [e[1] for e in recorder.events if e[0] == "shard_written"]
    assert written == [s.file_name for s in result.plan.shards]
    assert sum(e[1] for e in recorder.events if e[0] == "advance") == result.plan.total_size


def test_progress_object_is_closed_after_an_error(tmp_path):
    recorder = Recorder()
    with pytest.raises(reshard.SourceError):
        reshard.split(tmp_path / "missing", tmp_path / "out", progress=recorder)
    assert recorder.events == [("close",)]


def test_progress_callback_gets_done_and_total(sharded_source, tmp_path):
    seen: list[tuple[int, int]] = []
    result = reshard.split(
        sharded_source, tmp_path / "out", max_shard="20KB", progress=lambda d, t: seen.append((d, t))
    )
    total = result.plan.total_size
    assert seen and seen[-1] == (total, total)
    assert all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_progress_that_is_not_a_progress_is_refused(sharded_source, tmp_path):
    with pytest.raises(TypeError, match="progress=42"):
        reshard.split(sharded_source, tmp_path / "out", progress=42)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_tqdm_and_rich_adapters_draw_bars(sharded_source, tmp_path):
    import tqdm
    from rich.console import Console

    stream = io.StringIO()
    reshard.split(
        sharded_source,
        tmp_path / "a",
        max_shard="20KB",
        progress=reshard.TqdmProgress(tqdm.tqdm, file=stream),
    )
    assert "total: 100%" in stream.getvalue() and "48.0k/48.0k" in stream.getvalue()
    assert "shard 3/3" in stream.getvalue()
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    reshard.split(sharded_source, tmp_path / "b", max_shard="20KB", progress=reshard.RichProgress(console))
    assert "total" in console.file.getvalue() and "48.0/48.0 kB" in console.file.getvalue()


def test_public_names_resolve_and_import_nothing_heavy():
    for name in reshard.__all__:
        assert getattr(reshard, name) is not None, name
    assert reshard.ReshardError is __import__("reshard.errors").errors.ReshardError
    code = (
        "import sys\n"
        "from reshard import split, inspect, verify, plan, merge, push, ReshardError, Progress\n"
        "print(sorted(m for m in ('torch', 'numpy', 'typer', 'huggingface_hub') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_split_and_plan_stay_functions_after_their_modules_are_imported():
    """reshard/split.py and reshard/plan.py are modules as well; importing them must not
    replace the functions on the package."""
    code = (
        "import reshard.split, reshard.plan\n"
        "from reshard.split import split_checkpoint\n"
        "import reshard\n"
        "from reshard import split, plan\n"
        "print(split.__module__, plan.__module__, reshard.split is split, callable(split_checkpoint))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reshard.api", "reshard.api", "True", "True"]
