"""``python -m reshard.cli``."""

from reshard.cli import main

main()
