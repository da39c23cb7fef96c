"""Write genuine PyTorch DCP checkpoints with FSDP2 on CPU (gloo), the ways trainers do.

    torchrun --standalone --nproc-per-node 2 make_fsdp.py OUT

After real AdamW steps on a ``fully_shard``-ed model (rows split unevenly: 101 -> 51 + 50),
rank 0 and 1 write:

- ``OUT/fsdp2/``: ``dcp.save({"model": ..., "optim": ...})`` (torch's documented recipe);
- ``OUT/torchtitan/step-2/``: torchtitan's layout: model keys at the top level beside
  ``optimizer``, ``lr_scheduler`` and ``train_state``;
- ``OUT/accelerate/checkpoint-2/pytorch_model_fsdp_0`` (and ``optimizer_0``): written by
  accelerate's own ``save_fsdp_model`` / ``save_fsdp_optimizer`` (SHARDED_STATE_DICT),
  with config.json beside them;
- ``OUT/hf/``: ``HuggingFaceStorageWriter(save_distributed=True)``: one safetensors file per
  rank with DCP_SHARDING_INFO;
- ``OUT/zstd/``: ``FileSystemWriter(_extensions=[ZStandard()])`` (compressed items);
- ``OUT/reference.pt`` and ``OUT/config.json``: ``get_model_state_dict(full_state_dict=True)``,
  the stack's own consolidation, for the tests to compare with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default="fsdp2,torchtitan,accelerate,hf,zstd")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip reference.pt (benchmarks: only the checkpoint is needed)",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = common.build_model(args.size)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    vocab = common.SIZES[args.size]["vocab_size"]
    for step in range(args.steps):
        ids = common.batch(step, vocab, common.rank())
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    out = args.out
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    if "fsdp2" in only:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "fsdp2"))
    if "torchtitan" in only:
        # torchtitan flattens the model's state dict into the top level of what it saves.
        state = {
            **model_sd,
            "optimizer": optim_sd,
            "lr_scheduler": {"last_epoch": args.steps},
            "train_state": {"step": args.steps},
        }
        dcp.save(state, checkpoint_id=str(out / "torchtitan" / f"step-{args.steps}"))
    if "accelerate" in only:
        _save_with_accelerate(
            model, optimizer, out / "accelerate" / f"checkpoint-{args.steps}", args.size, args.steps
        )
    if "hf" in only:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        # safetensors refuses shared storage: the tied alias is left out, as HF checkpoints do.
        untied = {k: v for k, v in model_sd.items() if k != "lm_head.weight"}
        dcp.save(untied, storage_writer=HuggingFaceStorageWriter(str(out / "hf"), save_distributed=True))
    if "zstd" in only:
        from torch.distributed.checkpoint._extension import ZStandard
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        dcp.save(
            {"model": model_sd}, storage_writer=FileSystemWriter(str(out / "zstd"), _extensions=[ZStandard()])
        )
    if not args.no_reference:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if common.rank() == 0:
            torch.save(full, out / "reference.pt")
    if common.rank() == 0:
        common.tiny_config(args.size).save_pretrained(out)
    common.finish()


def _save_with_accelerate(model, optimizer, folder: Path, size: str, step: int) -> None:
    """accelerate's own FSDP2 SHARDED_STATE_DICT save functions, given the two plugin
    fields and the accelerator field they read."""
    from accelerate import PartialState
    from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    PartialState(cpu=True)  # accelerate's logging needs its state; the process group exists
    plugin = SimpleNamespace(
        fsdp_version=2,
        state_dict_type=StateDictType.SHARDED_STATE_DICT,
        state_dict_config=SimpleNamespace(),
        optim_state_dict_config=None,
    )
    accelerator = SimpleNamespace(process_index=common.rank(), num_processes=2)
    save_fsdp_model(plugin, accelerator, model, str(folder))
    save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder))
    if common.rank() == 0:
        common.write_model_folder(folder, size, step)


if __name__ == "__main__":
    main()
