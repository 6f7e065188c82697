"""One module per `kodkod` subcommand (see server/cli.py)."""
