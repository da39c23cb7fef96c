"""The loaders ``reshard bench`` times, each run in a fresh child process.

``python -m reshard.bench.loaders REQUEST.json RESULT.json`` imports what the loader needs,
then starts the clock, loads every tensor of the checkpoint, touches every byte it loaded
(a checksum on CPU, a copy to the device otherwise) and writes its figures as JSON. The
parent (``reshard.bench.measure``) samples the child's memory from outside and reads the kernel's
high-water mark when it exits; see docs/bench.md for why both are needed.

Loaders (each states which checkpoint formats it reads):

* ``safetensors``: ``safe_open`` + ``get_tensor`` for every tensor into a CPU state dict.
* ``torch``: a state dict the way a plain PyTorch script gets one: ``torch.load(path,
  weights_only=True)`` (torch's default ``mmap=False``: every storage read into memory)
  for ``.bin`` files, ``safetensors.torch.load_file`` for ``.safetensors``.
* ``torch-mmap``: the same with ``torch.load(..., mmap=True)``, as transformers loads
  ``.bin`` files: storages stay file-backed until touched.
* ``transformers``: ``AutoModelForCausalLM.from_pretrained`` on the folder (needs a
  config.json), then every parameter and buffer is touched.

>>> sorted(LOADERS)
['safetensors', 'torch', 'torch-mmap', 'transformers']
>>> LOADERS["safetensors"].reads("bin")
False
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader is and which checkpoint formats it can read.

    Attributes:
        name: the ``--loader`` value.
        formats: ``"safetensors"`` and/or ``"bin"``.
        needs_config: True when it loads a model, not a state dict (needs config.json).
        module: a top-level module that must be importable for the loader to run.
    """

    name: str
    formats: tuple[str, ...]
    needs_config: bool = False
    module: str = "torch"

    def reads(self, fmt: str) -> bool:
        return fmt in self.formats


LOADERS = {
    "safetensors": LoaderSpec("safetensors", ("safetensors",), module="safetensors"),
    "torch": LoaderSpec("torch", ("safetensors", "bin")),
    "torch-mmap": LoaderSpec("torch-mmap", ("safetensors", "bin")),
    "transformers": LoaderSpec(
        "transformers", ("safetensors", "bin"), needs_config=True, module="transformers"
    ),
}


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory lines of ``/proc/<pid>/status`` in bytes: ``VmHWM``, ``VmRSS``, ``RssAnon``...

    >>> proc_status()["VmRSS"] > 0
    True
    """
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def proc_read_bytes(pid: int | str = "self") -> int | None:
    """Bytes this process made the block layer fetch (``read_bytes`` of /proc/<pid>/io),
    or None where the kernel does not report it (no task I/O accounting, or no access).

    >>> isinstance(proc_read_bytes(), (int, type(None)))
    True
    """
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def checksum(tensor) -> int:
    """Sum of the tensor's bytes read as 64-bit words: reads every byte, ~memory speed.

    A lazily mapped tensor is faulted in here, so the cost of reading it from disk lands
    inside the timed region. The value only has to be the same for the same bytes.

    >>> import torch
    >>> checksum(torch.ones(4, dtype=torch.int64))
    4
    """
    import torch

    flat = tensor.detach().reshape(-1).view(torch.uint8)
    whole = flat.numel() // 8 * 8
    try:
        total = int(flat[:whole].view(torch.int64).sum()) if whole else 0
    except RuntimeError:  # storage offset not 8-byte aligned: slower, same coverage
        total = int(flat[:whole].sum(dtype=torch.int64))
    return total + int(flat[whole:].sum(dtype=torch.int64))


class Toucher:
    """Touches each loaded tensor: a checksum on CPU, a copy to the device otherwise
    (kept, as a real load would keep it), and records when the first tensor was done."""

    def __init__(self, device: str, t0: float) -> None:
        self.device, self.t0 = device, t0
        self.first: float | None = None
        self.total, self.nbytes, self.count = 0, 0, 0

    def __call__(self, name: str, tensor):
        """Touch ``tensor``; returns what a real load keeps (the device copy, if any)."""
        kept = tensor
        if self.device == "cpu":
            self.total += checksum(tensor)
        else:
            import torch

            kept = tensor.to(self.device)
            torch.cuda.synchronize()
        self.nbytes += tensor.numel() * tensor.element_size()
        self.count += 1
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        return kept


def load_safetensors(files: list[Path], touch: Toucher) -> dict:
    from safetensors import safe_open

    state: dict = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                state[name] = touch(name, f.get_tensor(name))
    return state


def load_torch(files: list[Path], touch: Toucher, mmap: bool = False) -> dict:
    import torch
    from safetensors.torch import load_file

    state: dict = {}
    for path in files:
        if path.name.endswith(".safetensors"):
            part = load_file(str(path), device="cpu")
        else:
            # weights_only: a pickle is untrusted input and must never run code.
            part = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        for name, tensor in _flat_state(part).items():
            if isinstance(tensor, torch.Tensor):
                state[name] = touch(name, tensor)
    return state


def _flat_state(obj) -> dict:
    """The tensors of a loaded ``.bin``: a state dict, or one nested under a usual key."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict) and not any(hasattr(v, "shape") for v in obj.values()):
                return obj[key]
        return obj
    return {}


def load_transformers(folder: Path, touch: Toucher) -> object:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": "auto"}
    if touch.device != "cpu":
        kwargs["device_map"] = touch.device
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    # The model is on its device already: touch in place (a checksum reads every byte).
    device, touch.device = touch.device, "cpu"
    for name, tensor in model.state_dict().items():
        touch(name, tensor)
    touch.device = device
    touch.first = None  # from_pretrained hands back nothing before it is done
    return model


def run_request(request: dict) -> dict:
    """Run one trial in this process; the parent calls this through ``main``.

    ``request``: ``{"loader", "device", "folder", "files"}``. Returns the child's figures
    (seconds, bytes); memory figures here are the child's own view, the parent adds its
    sampled ones.
    """
    started = time.perf_counter()
    loader = request["loader"]
    import torch  # every loader needs it; imported before the clock starts

    if loader == "transformers":
        import transformers  # noqa: F401  (import cost is not load cost)
    elif loader == "safetensors":
        import safetensors.torch  # noqa: F401
    if request["device"] != "cpu":
        torch.zeros(1, device=request["device"])  # CUDA context creation is not load cost
    base = proc_status()
    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    touch = Toucher(request["device"], t0)
    files = [Path(p) for p in request["files"]]
    kept: object  # the loaded tensors (or model), kept alive while memory is read
    if loader == "safetensors":
        kept = load_safetensors(files, touch)
    elif loader in ("torch", "torch-mmap"):
        kept = load_torch(files, touch, mmap=loader == "torch-mmap")
    else:
        kept = load_transformers(Path(request["folder"]), touch)
    load_s = time.perf_counter() - t0
    end = proc_status()  # while the loaded state is still alive
    read1 = proc_read_bytes()
    del kept
    return {
        "setup_s": t0 - started,
        "first_tensor_s": touch.first,
        "load_s": load_s,
        "tensors": touch.count,
        "tensor_bytes": touch.nbytes,
        "checksum": touch.total,
        "baseline_rss": base.get("VmRSS"),
        "baseline_anon": base.get("RssAnon"),
        "end_rss": end.get("VmRSS"),
        "end_anon": end.get("RssAnon"),
        "vm_hwm": end.get("VmHWM"),
        "read_bytes": None if read0 is None or read1 is None else read1 - read0,
    }


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m reshard.bench.loaders REQUEST.json RESULT.json``."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    result = run_request(request)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
