"""Genuine training checkpoints for the tests, written once per test session by the real
stacks on CPU (tests/training_scripts/*.py under torchrun): DeepSpeed ZeRO-1/2/3 with bf16,
FSDP2 DCP in four flavours, a 4-rank 2-D DTensor DCP.

All pytest-xdist workers share one copy: the first to ask builds it under a file lock in
the session's common temp folder; the others wait, then reuse it. Import the fixtures into
a test module with ``from training_fixtures import training_checkpoints``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "training_scripts"
GENERATORS = (  # (name, ranks, script)
    ("ds", 2, "make_zero.py"),
    ("fsdp", 2, "make_fsdp.py"),
    ("mesh", 4, "make_mesh.py"),
)
TIMEOUT = 900


def generator_env() -> dict[str, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("RESHARD_DEBUG", None)
    return env


def build_training_checkpoints(out: Path) -> None:
    """Run every generator (concurrently) into ``out``; raise with the log of a failure."""
    out.mkdir(parents=True, exist_ok=True)
    running = []
    for name, ranks, script in GENERATORS:
        log = open(out / f"{name}.log", "w")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            str(SCRIPTS / script),
            str(out / name),
        ]
        running.append(
            (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=generator_env()), log)
        )
    failed = []
    for name, proc, log in running:
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((name, code))
    if failed:
        name, code = failed[0]
        tail = (out / f"{name}.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"fixture generator {name} failed ({code}):\n{tail}")


def shared_folder(tmp_path_factory) -> Path:
    """The temp folder all xdist workers of this session share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def training_checkpoints(tmp_path_factory) -> Path:
    """The folder holding ``ds/``, ``fsdp/`` and ``mesh/`` (see the generators' docstrings);
    read-only for the tests."""
    reuse = os.environ.get("RESHARD_TRAINING_FIXTURES")
    if reuse:  # local iteration only: a folder an earlier session built (never in CI)
        return Path(reuse)
    root = shared_folder(tmp_path_factory)
    target = root / "training-checkpoints"
    with open(root / "training-checkpoints.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "complete").exists():
            building = root / "training-checkpoints.building"
            import shutil

            shutil.rmtree(building, ignore_errors=True)
            build_training_checkpoints(building)
            (building / "complete").write_text("ok\n")
            building.rename(target)
    return target


# name -> (path under the fixture folder, kind of reference to compare with)
CHECKPOINTS = {
    "zero1": "ds/zero1/checkpoint-2",
    "zero2": "ds/zero2/checkpoint-2",
    "zero3": "ds/zero3/checkpoint-2",
    "fsdp2": "fsdp/fsdp2",
    "torchtitan": "fsdp/torchtitan/step-2",
    "accelerate": "fsdp/accelerate/checkpoint-2",
    "hf-storage": "fsdp/hf",
    "mesh2d": "mesh/mesh2d",
}


def reference_state_dict(root: Path, name: str) -> dict:
    """What the training stack's own consolidation gives for checkpoint ``name``:
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (plus the frozen parameter
    ZeRO-1 keeps only in its 16-bit module), or ``get_model_state_dict(full_state_dict=True)``
    / ``DTensor.full_tensor()`` saved by the generator."""
    import contextlib
    import io

    import torch

    if name.startswith("zero"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ref = dict(get_fp32_state_dict_from_zero_checkpoint(str(root / CHECKPOINTS[name])))
        module = torch.load(root / "ds" / name / "engine_module.pt", weights_only=True)
        for key, value in module.items():
            ref.setdefault(key, value)
        return ref
    folder = "mesh" if name == "mesh2d" else "fsdp"
    return torch.load(root / folder / "reference.pt", weights_only=True)
