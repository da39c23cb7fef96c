"""``python -m reshard``: the same CLI as the ``reshard`` command."""

from reshard.cli import main

main()
