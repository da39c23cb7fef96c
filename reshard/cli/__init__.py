"""The command-line interface: a thin Typer layer over the library."""


def main() -> None:
    """Console-script entry point (imports the Typer app only when run)."""
    from reshard.cli.app import main as app_main

    app_main()
