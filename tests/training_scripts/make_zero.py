"""Write genuine DeepSpeed ZeRO checkpoints on CPU: real bf16 training steps, then
``engine.save_checkpoint`` into an HF-Trainer-like ``checkpoint-N/`` folder.

Run under torchrun (DeepSpeed reads RANK/WORLD_SIZE from it), on CPU:

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 make_zero.py OUT --stages 1,2,3

For each stage S it writes ``OUT/zero{S}/checkpoint-2/`` (config.json, trainer_state.json,
``latest`` and ``global_step2/``) and, from rank 0, ``OUT/zero{S}/engine_module.pt``: the
engine's own 16-bit module state dict (``module_state_dict()``, gathered for ZeRO-3),
which holds the frozen parameter ZeRO-1 keeps out of its optimizer files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def train_and_save(stage: int, out: Path, size: str, steps: int, reference: bool = True) -> None:
    import deepspeed
    import torch

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    from transformers import LlamaForCausalLM  # noqa: F401  (not importable inside zero.Init)

    if stage == 3 and size != "tiny":
        # Big models are built partitioned, as HF Trainer does under ZeRO-3: no rank ever
        # holds the whole fp32 model.
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = common.build_model(size)
    else:
        model = common.build_model(size)
    params = [p for p in model.parameters() if p.requires_grad]
    # A torch optimizer passed in: DeepSpeed's "Adam" JIT-compiles a C++ op on CPU.
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    vocab = common.SIZES[size]["vocab_size"]
    for step in range(steps):
        ids = common.batch(step, vocab, common.rank())
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    folder = out / f"zero{stage}" / f"checkpoint-{steps}"
    if common.rank() == 0:
        common.write_model_folder(folder, size, steps)
    engine.save_checkpoint(str(folder), tag=f"global_step{steps}")
    if reference:
        module = engine.module_state_dict() if stage < 3 else _gathered(engine)
        if common.rank() == 0:
            torch.save({k: v.clone() for k, v in module.items()}, out / f"zero{stage}" / "engine_module.pt")
    engine.destroy()


def _gathered(engine):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip engine_module.pt (benchmarks: only the checkpoint is needed)",
    )
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU at init (minutes on two
    # cores, once per machine); gloo does the same job for these tiny tensors.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (int(s) for s in args.stages.split(",")):
        train_and_save(stage, args.out, args.size, args.steps, not args.no_reference)
    common.finish()


if __name__ == "__main__":
    main()
