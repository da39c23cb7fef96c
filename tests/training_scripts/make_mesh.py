"""Write a genuine 2-D DTensor DCP checkpoint: 4 ranks on a 2 x 2 ("dp", "tp") CPU mesh.

    torchrun --standalone --nproc-per-node 4 make_mesh.py OUT

- ``OUT/mesh2d/``: every matrix of the tiny model as ``[Shard(0), Shard(1)]`` blocks (101 x 33
  -> 51/50 rows by 17/16 columns), vectors as ``[Shard(0), Replicate()]``; ``{"model": sd}``.
- ``OUT/mesh3d/``: 3-D tensors cut on their inner dims (``[Shard(1), Shard(2)]`` and
  ``[Shard(0), Shard(2)]``), as fused MoE expert weights are.
- ``OUT/reference.pt``, ``OUT/reference3d.pt``, ``OUT/config.json``: the full tensors
  (``DTensor.full_tensor()``), from rank 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = common.build_model()
    sd = {}
    for name, tensor in model.state_dict().items():
        placements = [Shard(0), Shard(1)] if tensor.dim() == 2 else [Shard(0), Replicate()]
        sd[name] = distribute_tensor(tensor.detach().clone(), mesh, placements)
    dcp.save({"model": sd}, checkpoint_id=str(args.out / "mesh2d"))

    g = torch.Generator().manual_seed(7)
    full3d = {
        "experts.gate_up_proj": torch.randn(3, 7, 10, generator=g),
        "experts.down_proj": torch.randn(5, 4, 9, generator=g).to(torch.bfloat16),
    }
    sd3d = {
        "experts.gate_up_proj": distribute_tensor(full3d["experts.gate_up_proj"], mesh, [Shard(1), Shard(2)]),
        "experts.down_proj": distribute_tensor(full3d["experts.down_proj"], mesh, [Shard(0), Shard(2)]),
    }
    dcp.save(sd3d, checkpoint_id=str(args.out / "mesh3d"))
    full = {name: t.full_tensor() for name, t in sd.items()}
    if common.rank() == 0:
        torch.save(full, args.out / "reference.pt")
        torch.save(full3d, args.out / "reference3d.pt")
        common.tiny_config().save_pretrained(args.out)
    common.finish()


if __name__ == "__main__":
    main()
