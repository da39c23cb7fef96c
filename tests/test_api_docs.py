"""Every ```python block of docs/python.md (and of README.md), run in order like notebook
cells, in one fresh interpreter, on a small generated Mistral at ./my-model, with
tests/hubserver.py as the Hub (huggingface_hub reads HF_ENDPOINT at import, hence the
subprocess). A block that raises fails the test with its line on the page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO_ROOT
from hubserver import HubServer

PAGE = REPO_ROOT / "docs" / "python.md"
TOKEN = "hf_docsTestToken1234567890secret"

RUNNER = """
import json, sys, traceback
ns = {"__name__": "__main__"}
page, blocks = sys.argv[2], json.load(open(sys.argv[1]))
for line, code in blocks:
    try:
        # Padding keeps the page's line numbers in tracebacks.
        exec(compile("\\n" * (line - 1) + code, page, "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"{page}: the block at line {line} failed", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} blocks")
"""


def run_blocks(page: str, blocks: list[tuple[int, str]], work, env: dict) -> subprocess.CompletedProcess:
    """The blocks, in order, in one fresh interpreter whose working folder is ``work``."""
    (work.parent / "blocks.json").write_text(json.dumps(blocks))
    (work.parent / "runner.py").write_text(RUNNER)
    env = {**os.environ, **env}
    env.pop("RESHARD_DEBUG", None)
    done = subprocess.run(
        [sys.executable, str(work.parent / "runner.py"), str(work.parent / "blocks.json"), page],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.rstrip().endswith(f"ran {len(blocks)} blocks")
    return done


def notebook_folder(tmp_path, tiny_mistral_dir):
    work = tmp_path / "notebook"
    work.mkdir()
    shutil.copytree(tiny_mistral_dir, work / "my-model")
    return work


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first code line, code)`` of each fenced ```python block.

    >>> python_blocks("a\\n```python\\nx = 1\\n```\\n```bash\\nls\\n```\\n")
    [(3, 'x = 1\\n')]
    """
    return [
        (text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    ]


def test_every_python_block_of_the_page_runs(tiny_mistral_dir, tmp_path):
    blocks = python_blocks(PAGE.read_text())
    code = "".join(c for _, c in blocks)
    for name in ("split", "inspect", "verify", "plan", "merge", "push"):
        assert f"reshard.{name}(" in code, f"docs/python.md has no example of reshard.{name}"
    assert len(blocks) >= 12
    work = notebook_folder(tmp_path, tiny_mistral_dir)
    with HubServer(tokens={TOKEN: "me"}) as hub:
        done = run_blocks("docs/python.md", blocks, work, hub.env(str(tmp_path / "hf-home"), TOKEN))
        pushed = hub.files("me/my-model-2GB")
    # What the cells said they did, on disk and on the Hub.
    assert "cannot split: no such file or folder" in done.stdout
    assert "written: model-00001-of-" in done.stdout
    for folder in ("my-model-2GB", "my-model-tp2/rank-1", "my-model-merged", "my-model-100KB"):
        assert (work / folder / "config.json").is_file(), folder
    assert (work / "device_map.json").is_file()
    assert {"config.json", "README.md", "model.safetensors"} <= set(pushed)
    assert pushed["model.safetensors"] == (work / "my-model-2GB" / "model.safetensors").read_bytes()


def test_the_readme_python_example_runs(tiny_mistral_dir, tmp_path):
    blocks = python_blocks((REPO_ROOT / "README.md").read_text())
    assert len(blocks) == 1 and len(blocks[0][1].splitlines()) == 3  # the three-line example
    work = notebook_folder(tmp_path, tiny_mistral_dir)
    run_blocks("README.md", blocks, work, {"HF_HUB_OFFLINE": "1"})
    assert (work / "my-model-2GB" / "model.safetensors").is_file()
