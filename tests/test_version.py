"""`reshard --version` / `-V` and shell completion, with the real CLI in subprocesses.

--version reads package metadata: it must not import torch (seconds) or anything else heavy,
which is checked in `sys.modules` of a fresh interpreter. Completion is Typer's own
mechanism; the bash script it prints is sourced in a real bash and asked to complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import run_cli

import reshard

LIBRARIES = ("torch", "safetensors", "huggingface_hub", "transformers")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_reshard_and_each_library_on_its_own_line(flag):
    done = run_cli(flag)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"reshard {reshard.__version__}"
    assert reshard.__version__ == version("reshard")  # the code and the package metadata agree
    assert lines[1:] == [f"{name} {version(name)}" for name in LIBRARIES]


def test_version_imports_no_torch():
    code = (
        "import json, sys\n"
        "from reshard.cli.app import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as e:\n"
        "    status = e.code\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'safetensors', 'huggingface_hub', 'transformers') "
        "if m in sys.modules)\n"
        "print(json.dumps({'status': status, 'heavy': heavy}), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reshard {reshard.__version__}\ntorch ")
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"status": 0, "heavy": []}


def test_version_skips_a_library_that_is_not_installed(monkeypatch):
    from reshard.cli import app as app_module

    monkeypatch.setattr(app_module, "VERSION_PACKAGES", ("torch", "reshard-no-such-package"))
    assert app_module.version_lines() == [f"reshard {reshard.__version__}", f"torch {version('torch')}"]


def test_version_with_a_command_is_still_just_the_version():
    done = run_cli("--version", "split", "./no/such/model")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"reshard {reshard.__version__}"


def test_bash_completion_script_completes_commands_and_options(tmp_path):
    """`reshard --show-completion` run from bash (Typer detects the shell from its parent
    processes, as it does for a person typing it) prints the script; sourced in that bash,
    it completes commands and options."""
    bash = shutil.which("bash")
    assert bash is not None, "bash is needed for the completion test"
    # The script runs `reshard` itself: the console script of this environment.
    console_script = Path(sys.executable).parent / "reshard"
    assert console_script.is_file()
    probe = (
        "reshard --show-completion > reshard-completion.bash || exit 1\n"
        "source reshard-completion.bash\n"
        'complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _reshard_completion reshard; '
        'printf "%s\\n" "${COMPREPLY[@]}"; echo ---; }\n'
        "complete_words reshard sp\n"
        "complete_words reshard split --max\n"
        "complete_words reshard ''\n"
    )
    env = {**os.environ, "PATH": f"{console_script.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RESHARD_DEBUG", None)
    done = subprocess.run(
        [bash, "--norc", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "reshard-completion.bash").read_text()
    assert "_RESHARD_COMPLETE=complete_bash" in script
    assert "complete -o default -F _reshard_completion reshard" in script
    commands, options, everything, _ = done.stdout.split("---\n")
    assert commands.split() == ["split"]
    assert options.split() == ["--max-shard"]
    assert {"split", "inspect", "verify", "plan", "merge", "push", "bench"} <= set(everything.split())


def test_help_lists_version_and_completion_options():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--version", "-V", "--install-completion", "--show-completion"):
        assert option in done.stdout


def test_cli_md_shows_what_version_prints():
    """docs/cli.md quotes `reshard --version` as it prints here: reshard's own line exactly,
    then the same libraries in the same order (their versions may differ from the
    tested ones, e.g. with `make test TORCH_VERSION=...`)."""
    from conftest import REPO_ROOT

    text = (REPO_ROOT / "docs" / "cli.md").read_text()
    start = text.index("$ reshard --version\n") + len("$ reshard --version\n")
    quoted = text[start : text.index("```", start)].splitlines()
    printed = run_cli("--version").stdout.splitlines()
    assert quoted[0] == printed[0] == f"reshard {reshard.__version__}"
    assert [line.split()[0] for line in quoted] == [line.split()[0] for line in printed]
