"""Issue 18 item 19: details of the docs checked against what the tool really prints and
writes (the real CLI in subprocesses), so the pages cannot drift from the code again."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile

import numpy as np
from conftest import REPO_ROOT, run_cli, write_safetensors
from hubserver import HubServer

DOCS = REPO_ROOT / "docs"


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_formats_md_quotes_the_unpickler_refusal_as_printed(tmp_path):
    import torch

    src = tmp_path / "src"
    src.mkdir()
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as clean, zipfile.ZipFile(src / "pytorch_model.bin", "w") as bad:
        for info in clean.infolist():
            data = clean.read(info)
            bad.writestr(
                info,
                pickle.dumps({"w": _System()}, protocol=2) if info.filename.endswith("data.pkl") else data,
            )
    proc = run_cli("split", str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    printed = proc.stderr.strip().replace(f"{src}/", "")
    quoted = re.findall(
        r"`(error: pytorch_model\.bin: refuses global [^`]*)`", (DOCS / "formats.md").read_text()
    )
    assert len(quoted) == 1, quoted
    head, tail = quoted[0].split(" ... ")
    assert printed.startswith(head) and tail in printed, (quoted[0], printed)


def doc_index_example() -> dict:
    text = (DOCS / "formats.md").read_text()
    block = text[text.index("Index (what transformers writes") :]
    return json.loads(block[block.index("```json") + 7 : block.index("```", block.index("```json") + 7)])


def test_formats_md_index_example_has_the_metadata_split_writes(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        write_safetensors(
            src / f"model-0000{k + 1}-of-00002.safetensors",
            {f"model.layers.{k}.w": rng.standard_normal((64, 64)).astype("float32")},
        )
    (src / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 2 * 64 * 64 * 4},
                "weight_map": {
                    f"model.layers.{k}.w": f"model-0000{k + 1}-of-00002.safetensors" for k in range(2)
                },
            }
        )
    )
    with HubServer() as hub:
        hub.add_repo("org/tiny", {p.name: p.read_bytes() for p in src.iterdir()})
        env = {**hub.env(str(tmp_path / "hf-home")), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        proc = run_cli(
            "split", "org/tiny", "-o", str(tmp_path / "hub-out"), "--max-shard", "20KB", "-q", env=env
        )
    assert proc.returncode == 0, proc.stderr
    from_hub = json.loads((tmp_path / "hub-out" / "model.safetensors.index.json").read_text())
    example = doc_index_example()
    assert sorted(example["metadata"]) == sorted(from_hub["metadata"])
    assert list(example) == list(from_hub) == ["metadata", "weight_map"]
    assert from_hub["metadata"]["reshard_source"] == example["metadata"]["reshard_source"].replace(
        "mistralai/Mistral-7B-v0.1", "org/tiny"
    )
    local = run_cli("split", str(src), "-o", str(tmp_path / "local-out"), "--max-shard", "20KB", "-q")
    assert local.returncode == 0, local.stderr
    from_local = json.loads((tmp_path / "local-out" / "model.safetensors.index.json").read_text())
    # What the text says a local source gets: the example's keys minus the Hub's two.
    assert sorted(from_local["metadata"]) == sorted(
        set(example["metadata"]) - {"reshard_source", "reshard_revision"}
    )


def test_bench_md_json_keys_are_the_ones_bench_prints(tmp_path):
    rng = np.random.default_rng(1)
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
        write_safetensors(
            folder / "model.safetensors", {"w": rng.standard_normal((32, 32)).astype("float32")}
        )
    proc = run_cli(
        "bench",
        str(before),
        str(after),
        "--loader",
        "safetensors",
        "--cache",
        "warm",
        "--repeats",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    text = " ".join((DOCS / "bench.md").read_text().split())
    sides = re.search(r"`before`/`after` \(([^)]*)\)", text).group(1)
    named = [k.split(":")[0].strip() for k in sides.split(",")]  # "weight_bytes: what it is"
    assert named == list(data["before"]) == list(data["after"])
    trials = re.search(r"`trials` \(one object per trial, ([^)]*)\)", text).group(1)
    assert sorted(re.findall(r"`(\w+)`", trials)) == sorted(data["trials"][0])


def test_readme_split_peak_rss_is_the_measured_one():
    """README's split table shows the peak RSS of the last bench_split run, as saved in
    docs/bench-split-results.txt (the JSON line bench/bench_split.py prints, newest last)."""
    results = (DOCS / "bench-split-results.txt").read_text().splitlines()
    measured = json.loads([line for line in results if line.startswith("{")][-1])["results"]
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("| checkpoint | split (median) |") :]
    rows = [line for line in table.splitlines()[2:4]]
    for row, result in zip(rows, measured):
        assert f"**{result['a_peak_rss_mb']:.1f} MB**" in row, (row, result["a_peak_rss_mb"])
    assert f"the {round(measured[0]['a_peak_rss_mb'])} MB are" in readme
