"""Issue 18, the command line as a new user meets it, with the real CLI in subprocesses:
--checksum output that sha256sum -c reads (item 9), one-line option errors (11), a JSON
failure object (12), no 80-column wrapping in pipes (13), a quiet exit on a closed pipe
(14), options that do nothing refused (17), --dtype with safetensors names (18) and
`python -m reshard.demo --help` (20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_safetensors

from reshard.formats.safetensors import read_header


@pytest.fixture
def source(tmp_path) -> Path:
    """Four float32 tensors in one file, plus config.json: 2 shards at --max-shard 8KB."""
    folder = tmp_path / "src"
    folder.mkdir()
    rng = np.random.default_rng(5)
    write_safetensors(
        folder / "model.safetensors",
        {f"model.layers.{i}.w": rng.standard_normal((30, 30)).astype("float32") for i in range(4)},
    )
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -- item 9: --checksum ----------------------------------------------------------------------


def test_checksum_stdout_is_exactly_what_sha256sum_checks(source, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("split", str(source), "-o", str(out), "--max-shard", "8KB", "--checksum")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(list(out.iterdir())) == 4  # 2 shards, index, config.json
    check = subprocess.run(
        ["sha256sum", "-c", "--strict", "-"], input=proc.stdout, text=True, capture_output=True, cwd=out
    )
    assert check.returncode == 0 and check.stderr == "", check.stderr
    assert check.stdout.count(": OK") == 4
    assert f"wrote {out}" in proc.stderr  # the table went to stderr, for people


# -- item 11: option-parsing errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "args,expected",
    [
        (["split", "SRC", "--maxshard", "2GB"], "No such option: --maxshard"),
        (["split", "SRC", "--tp", "two"], "Invalid value for '--tp'"),
        (["split"], "Missing argument"),
        (["inspect", "SRC", "--json", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_option_parsing_errors_are_one_error_line(source, args, expected):
    args = [str(source) if a == "SRC" else a for a in args]
    line = one_error_line(run_cli(*args), 2)
    assert expected in line and "--help" in line, line
    assert "╭" not in line


# -- item 12: --json on failure ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args,code",
    [
        (["split", "./no/such/model", "--json"], 1),  # a reshard error
        (["split", "SRC", "--max-shard", "lots", "--json"], 2),  # a bad option value
        (["split", "SRC", "--tp", "two", "--json"], 2),  # an option Typer cannot parse
    ],
)
def test_json_failure_prints_ok_false_with_the_error(source, args, code):
    args = [str(source) if a == "SRC" else a for a in args]
    proc = run_cli(*args)
    line = one_error_line(proc, code)
    assert json.loads(proc.stdout) == {"ok": False, "error": line.removeprefix("error: ")}


def test_json_success_says_ok_true(source, tmp_path):
    proc = run_cli("split", str(source), "-o", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


# -- item 13: one line per fact in a pipe ------------------------------------------------------


def test_piped_output_keeps_one_line_per_fact(tiny_mistral_dir, tmp_path):
    deep = tmp_path / ("a-folder-name-long-enough-to-push-every-summary-line-past-80-columns" * 2)
    deep.mkdir()
    proc = run_cli("inspect", str(tiny_mistral_dir))
    assert proc.returncode == 0, proc.stderr
    summary = [line for line in proc.stdout.splitlines() if "tensors," in line]
    assert len(summary) == 1 and summary[0].startswith(str(tiny_mistral_dir)), proc.stdout
    assert "parameters" in summary[0] and summary[0].rstrip().endswith(("KB", "MB", "GB"))
    plain = deep / "plain"
    proc = run_cli("split", str(tiny_mistral_dir), "-o", str(plain), "--max-shard", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {plain}" in proc.stdout.splitlines()
    assert any(
        line.startswith("│ model-00001-of-") and line.endswith("│") for line in proc.stdout.splitlines()
    )  # table rows are not wrapped either
    tp = deep / "tp2"
    assert run_cli("split", str(tiny_mistral_dir), "-o", str(tp), "--tp", "2", "-q").returncode == 0
    merged = deep / "merged"
    proc = run_cli("merge", str(tp), "-o", str(merged))
    assert proc.returncode == 0, proc.stderr
    wrote = [line for line in proc.stdout.splitlines() if line.strip()]
    assert (
        len(wrote) == 1
        and wrote[0].startswith(f"wrote {merged}: ")
        and wrote[0].endswith("(merged from tensor parallel)")
    ), proc.stdout


# -- item 14: a closed pipe --------------------------------------------------------------------


def run_with_closed_stdout(*args: str) -> tuple[int, str]:
    """Run the CLI with a stdout pipe whose reader is gone before it writes (what
    `| head -1` becomes once head exits): every write gets EPIPE."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("RESHARD_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reshard.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    return proc.wait(timeout=300), stderr


def test_closed_pipe_ends_quietly_with_sigpipe_status_and_keeps_the_output(source, tmp_path):
    code, stderr = run_with_closed_stdout("inspect", str(source))
    assert (code, stderr) == (141, "")
    out = tmp_path / "out"
    code, stderr = run_with_closed_stdout("split", str(source), "-o", str(out), "--max-shard", "8KB")
    assert (code, stderr) == (141, "")
    verified = run_cli("verify", str(out), "--against", str(source))
    assert verified.returncode == 0, verified.stderr  # the split it had finished is all there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folder left


# -- item 17: options that would do nothing ----------------------------------------------------


@pytest.mark.parametrize(
    "args,named",
    [
        (["split", "SRC", "--private"], "--private"),
        (["split", "SRC", "--create-pr", "--commit-message", "x"], "--create-pr, --commit-message"),
        (["split", "SRC", "--push-revision", "dev"], "--push-revision"),
        (["split", "SRC", "--revision", "main"], "--revision"),
        (["split", "SRC", "--token", "hf_unused"], "--token"),
        (["split", "SRC", "--dry-run", "--checksum"], "--checksum"),
        (["inspect", "SRC", "--revision", "v1"], "--revision"),
        (["verify", "OUT", "--key", "model"], "--key"),
    ],
)
def test_options_that_do_nothing_are_refused(source, tmp_path, args, named):
    out = tmp_path / "out"
    if "OUT" in args:
        assert run_cli("split", str(source), "-o", str(out), "-q").returncode == 0
    args = [str(source) if a == "SRC" else str(out) if a == "OUT" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error_line(run_cli(*args, cwd=tmp_path), 2)
    assert f"error: {named} does nothing here" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert "hf_unused" not in line


# -- item 18: --dtype takes the names inspect prints --------------------------------------------


@pytest.mark.parametrize("name,dtype", [("F16", "F16"), ("F32", "F32"), ("BF16", "BF16"), ("f16", "F16")])
def test_dtype_accepts_safetensors_names(source, tmp_path, name, dtype):
    out = tmp_path / "out"
    proc = run_cli("split", str(source), "-o", str(out), "--dtype", name, "-q")
    assert proc.returncode == 0, proc.stderr
    assert {t.dtype for t in read_header(out / "model.safetensors").tensors} == {dtype}


# -- item 20: the demo's --help ----------------------------------------------------------------


def test_demo_help_explains_and_runs_nothing(tmp_path):
    env = {**os.environ, "RESHARD_DEMO_DIR": str(tmp_path / "demo")}
    proc = subprocess.run(
        [sys.executable, "-m", "reshard.demo", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m reshard.demo") and "--dir" in proc.stdout
    assert "Mistral-7B" in proc.stdout and "RESHARD_DEMO_DIR" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing generated, split or verified
