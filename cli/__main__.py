"""`python -m cli`: the `mlxq` command."""

from cli.main import app

app()
