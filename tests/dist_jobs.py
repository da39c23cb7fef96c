"""Several ``reshard split`` commands in one torchrun job, one after another in each
worker process, so a test pays torchrun's start-up (torch import, rendezvous, gloo) once
for several checks.

    python -m torch.distributed.run ... tests/dist_jobs.py MANIFEST

MANIFEST is a JSON list of argument lists (``["split", SRC, "-o", OUT, ...]``). Each runs
through the real CLI entry point (``reshard.cli.main``) with its stdout going to
``OUT.rank-<RANK>.stdout``; this process exits non-zero if any command did.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    from reshard.cli import main as cli_main

    jobs = json.loads(Path(sys.argv[1]).read_text())
    rank = os.environ.get("RANK", "0")
    failed = 0
    for args in jobs:
        out = Path(args[args.index("-o") + 1])
        sys.argv = ["reshard", *args]
        with open(f"{out}.rank-{rank}.stdout", "w") as stdout, contextlib.redirect_stdout(stdout):
            try:
                cli_main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        failed = failed or code
    sys.exit(failed)


if __name__ == "__main__":
    main()
