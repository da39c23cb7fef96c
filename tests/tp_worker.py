"""One tensor-parallel rank of a real forward pass, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node W tests/tp_worker.py MANIFEST

Each job names its degree N (a divisor of W); the W processes split into W / N groups of
N that run the jobs of that degree side by side, one launch for every degree. For every
job, each process reads only its own rank folder (written from
reshard's per-rank plan) and ``tp_plan.json``, builds the family's transformers model with
the per-rank head/width counts, loads its tensors and runs the forward pass the way
serving engines do:

- attention and MLP outputs are partial sums over ranks (row-parallel ``o_proj`` and
  ``down_proj``; routed experts' outputs, split or placed whole): all-reduced;
- row-parallel biases are kept whole by the split and added once: rank 0 keeps them,
  the others zero them before the all-reduce;
- the embedding is vocab-parallel (each rank looks up its rows, the others give zeros,
  all-reduce) and the head gathers each rank's vocabulary slice of the logits;
- under expert parallelism a rank holds only its experts; the slots of the others are
  zero, so they add nothing, and the all-reduce adds the owners' outputs.

Rank 0 writes the logits of a fixed prompt to the job's ``out`` file (torch.save).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def rank_state(folder: Path, plan: dict, rank: int) -> dict:
    """This rank's tensors, plus zero placeholders for experts other ranks hold."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    degree = plan["tp"]
    for name, record in plan["tensors"].items():
        if record["split"] != "expert":
            continue
        if record["dim"] is None and name not in state:  # a whole expert on another rank
            state[name] = torch.zeros(record["shape"], dtype=state_dtype(state))
        elif record["dim"] == 0:  # fused experts [E, ...]: put ours at their slots
            full = torch.zeros(record["shape"], dtype=state[name].dtype)
            per = record["shape"][0] // degree
            full[rank * per : (rank + 1) * per] = state[name]
            state[name] = full
    return state


def state_dtype(state: dict):
    return next(iter(state.values())).dtype


class VocabParallelEmbedding:
    """Wraps an embedding that holds vocabulary rows ``[start, start + rows)``."""

    def __init__(self, inner, start: int):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, ids):
                import torch.distributed as dist

                rows = self.inner.weight.shape[0]
                local = ids - start
                inside = (local >= 0) & (local < rows)
                out = self.inner(local.clamp(0, rows - 1)) * inside.unsqueeze(-1)
                dist.all_reduce(out, group=GROUP)
                return out

        self.module = Module()


GROUP = None  # the process group of the job being run (set by main)


def all_reduce_output(module, args, output):
    import torch.distributed as dist

    dist.all_reduce(output[0] if isinstance(output, tuple) else output, group=GROUP)
    return output


def gather_vocab(module, args, output):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(output) for _ in range(dist.get_world_size(GROUP))]
    dist.all_gather(parts, output.contiguous(), group=GROUP)
    return torch.cat(parts, dim=-1)


def run_job(job: dict, rank: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    split = Path(job["split"])
    plan = json.loads((split / "tp_plan.json").read_text())
    folder = split / plan["ranks"][rank]
    config = json.loads((folder / "config.json").read_text())
    config.update(job["rank_config"])
    for key, value in job.get("text_config", {}).items():
        config["text_config"][key] = value
    scratch = Path(job["scratch"]) / f"rank-{rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    save_file(rank_state(folder, plan, rank), str(scratch / "model.safetensors"), metadata={"format": "pt"})
    (scratch / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(
        scratch, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    base = model.model
    vocab_rows = base.embed_tokens.weight.shape[0]
    base.embed_tokens = VocabParallelEmbedding(base.embed_tokens, rank * vocab_rows).module
    with torch.no_grad():
        for layer in base.layers:
            layer.self_attn.register_forward_hook(all_reduce_output)
            layer.mlp.register_forward_hook(all_reduce_output)
            if rank != 0:  # row-parallel biases: added once, after the all-reduce
                if getattr(layer.self_attn.o_proj, "bias", None) is not None:
                    layer.self_attn.o_proj.bias.zero_()
                experts = getattr(layer.mlp, "experts", None)
                if not job.get("expert_parallel") and hasattr(experts, "down_proj_bias"):
                    experts.down_proj_bias.zero_()
    model.lm_head.register_forward_hook(gather_vocab)
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
    if rank == 0:
        torch.save(logits, job["out"])


def main() -> None:
    global GROUP
    from datetime import timedelta

    import torch.distributed as dist

    jobs = json.loads(Path(sys.argv[1]).read_text())["jobs"]
    # A job that fails on one rank only would leave the others waiting in a collective:
    # the timeout ends them (and the parent's subprocess timeout ends the launch).
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    for n in sorted({job["n"] for job in jobs}):
        # Every process creates every group, in the same order, as new_group requires.
        groups = [dist.new_group(list(range(start, start + n))) for start in range(0, world, n)]
        slot = rank // n
        GROUP = groups[slot]
        mine = [job for i, job in enumerate(j for j in jobs if j["n"] == n) if i % len(groups) == slot]
        for job in mine:
            try:
                run_job(job, rank - slot * n)
            except Exception as e:  # report per job; the parent test names it
                if rank == slot * n:
                    Path(job["out"] + ".error").write_text(f"{type(e).__name__}: {e}")
            dist.barrier(group=GROUP)
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown sometimes aborts after the work is done


if __name__ == "__main__":
    main()
