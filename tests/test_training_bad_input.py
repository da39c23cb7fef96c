"""Bad training checkpoints (issue 10): each gets one line naming the file at fault and
what to do, a non-zero exit, and nothing written (neither the output nor a temporary
folder). Hostile pickles are refused before anything they ask for runs: their payload
would create a marker file, which must never appear. Run as real subprocesses on damaged
copies of the genuine fixtures.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from training_fixtures import CHECKPOINTS, training_checkpoints  # noqa: F401


class Payload:
    """Pickles as a call of os.system: what a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_of(root: Path, name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "src" / Path(CHECKPOINTS[name]).name
    shutil.copytree(root / CHECKPOINTS[name], folder)
    if not (folder / "config.json").exists():
        shutil.copy(root / "fsdp" / "config.json", folder.parent / "config.json")
    return folder


def rewrite_metadata(folder: Path, change) -> None:
    """Edit a DCP .metadata with torch's own classes (the test trusts its own file)."""
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)
    change(meta)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def first_weight_item(meta):
    return next(
        (k, v) for k, v in meta.storage_data.items() if k.fqn.startswith("model.") and k.offset is not None
    )


def fails_cleanly(tmp_path: Path, source: Path, *expected: str, args=()) -> str:
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("split", str(source), "-o", str(out), "-q", *args)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left
    return lines[0]


# --- DCP ---------------------------------------------------------------------------------


def test_dcp_missing_rank_file(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)
    (src / "__1_0.distcp").unlink()
    fails_cleanly(tmp_path, src, "__1_0.distcp", "missing", "copy every *.distcp")


def test_dcp_truncated_rank_file(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "mesh2d", tmp_path)
    path = src / "__3_0.distcp"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fails_cleanly(tmp_path, src, "__3_0.distcp", "truncated")


def test_dcp_metadata_names_an_offset_that_is_not_there(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)

    def far(meta):
        key, info = first_weight_item(meta)
        meta.storage_data[key] = type(info)(info.relative_path, 10**9, info.length)

    rewrite_metadata(src, far)
    fails_cleanly(tmp_path, src, "not inside the file", "__0_0.distcp")


def test_dcp_metadata_names_a_file_that_is_not_there(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)

    def elsewhere(meta):
        key, info = first_weight_item(meta)
        meta.storage_data[key] = type(info)("__7_0.distcp", info.offset, info.length)

    rewrite_metadata(src, elsewhere)
    fails_cleanly(tmp_path, src, "__7_0.distcp", "missing")


def test_dcp_metadata_pointing_outside_the_folder_is_refused(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)

    def escape(meta):
        key, info = first_weight_item(meta)
        meta.storage_data[key] = type(info)("../../etc/passwd", 0, info.length)

    rewrite_metadata(src, escape)
    fails_cleanly(tmp_path, src, "outside the checkpoint folder")


def test_dcp_hostile_metadata_pickle_never_runs(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    (src / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": Payload(marker)}, protocol=4))
    fails_cleanly(tmp_path, src, ".metadata", "refuses global posix.system", "nothing was executed")
    assert not marker.exists()


def test_dcp_hostile_item_pickle_never_runs(training_checkpoints, tmp_path):
    """A chunk whose torch.save item is a hostile pickle: .metadata points at it."""
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned-item"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    rank_file = src / "__0_0.distcp"
    offset = rank_file.stat().st_size
    with open(rank_file, "ab") as f:
        f.write(buffer.getvalue())

    def to_payload(meta):
        key, info = first_weight_item(meta)
        meta.storage_data[key] = type(info)(info.relative_path, offset, len(buffer.getvalue()))

    rewrite_metadata(src, to_payload)
    fails_cleanly(tmp_path, src, "__0_0.distcp", "refuses global posix.system")
    assert not marker.exists()


def test_dcp_zstd_items_are_refused_naming_the_option(training_checkpoints, tmp_path):
    src = tmp_path / "src" / "zstd"
    shutil.copytree(training_checkpoints / "fsdp" / "zstd", src)
    fails_cleanly(
        tmp_path, src, "compressed", "stream.zstd", "_extensions=[ZStandard()]", "dcp_to_torch_save"
    )


def test_dcp_optimizer_only_folder(training_checkpoints, tmp_path):
    src = tmp_path / "src" / "optimizer_0"
    shutil.copytree(training_checkpoints / "fsdp" / "accelerate" / "checkpoint-2" / "optimizer_0", src)
    fails_cleanly(tmp_path, src, "no model weights", "pytorch_model_fsdp_0")


def test_hf_storage_missing_rank_file(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "hf-storage", tmp_path)
    (src / "shard-00001-model-00001-of-00001.safetensors").unlink()
    fails_cleanly(tmp_path, src, "shard-00001-model-*.safetensors is missing", "copy every rank's file")


def test_hf_storage_chunks_that_leave_a_gap(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "hf-storage", tmp_path)
    path = src / "shard-00001-model-00001-of-00001.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["model.norm.weight"]  # rank 0's rows of one tensor are gone
    save_file(tensors, path, metadata=metadata)
    fails_cleanly(tmp_path, src, "model.norm.weight", "do not add up")


# --- DeepSpeed ---------------------------------------------------------------------------


def test_zero_missing_rank_file(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero3", tmp_path)
    (src / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    fails_cleanly(tmp_path, src, "global_step2", "partition_count says 2 ranks", "1 optimizer files")


def test_zero_missing_model_states_of_a_rank(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero3", tmp_path)
    (src / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    fails_cleanly(tmp_path, src, "model states file of rank 0 is missing")


def test_zero_truncated_optimizer_file(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero2", tmp_path)
    path = src / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:-3000])
    fails_cleanly(tmp_path, src, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_zero_world_sizes_disagree(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero1", tmp_path)
    path = src / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    state = torch.load(path, weights_only=False)  # trusted: written by this session
    state["optimizer_state_dict"]["partition_count"] = [4]
    torch.save(state, path)
    fails_cleanly(tmp_path, src, "disagree on the world size", "different runs")


def test_zero_hostile_pickle_never_runs(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero3", tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned-zero"
    path = src / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "param_shapes": [], "x": Payload(marker)}, path)
    fails_cleanly(tmp_path, src, "zero_pp_rank_1_mp_rank_00_model_states.pt", "refuses global posix.system")
    assert not marker.exists()


def test_zero_pickled_module_is_refused(training_checkpoints, tmp_path):
    """A pickle naming a class outside DeepSpeed's data classes (here torch.nn.Linear)."""
    src = copy_of(training_checkpoints, "zero1", tmp_path)
    path = src / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"partition_count": 2, "layer": torch.nn.Linear(2, 2)}}, path)
    fails_cleanly(tmp_path, src, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "refuses global")


def test_zero_unknown_tag(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "zero2", tmp_path)
    fails_cleanly(
        tmp_path, src, "no DeepSpeed tag 'global_step9'", "global_step2", args=("--tag", "global_step9")
    )


def test_tag_on_a_dcp_source_is_a_usage_error(training_checkpoints, tmp_path):
    src = copy_of(training_checkpoints, "fsdp2", tmp_path)
    line = fails_cleanly(tmp_path, src, "--tag", args=("--tag", "global_step2"))
    assert "dcp" in line


@pytest.mark.parametrize("entry", ["data.pkl"])
def test_zero_optimizer_zip_without_its_pickle(training_checkpoints, tmp_path, entry):
    src = copy_of(training_checkpoints, "zero3", tmp_path)
    path = src / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(path) as z:
        kept = [(i, z.read(i)) for i in z.infolist() if not i.filename.endswith(entry)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in kept:
            z.writestr(info, data)
    fails_cleanly(tmp_path, src, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "data.pkl")
