"""More `netforge` subcommands. Each module here registers its commands on
``netforge.cli.cli`` when imported; netforge.cli imports every module of this package."""
