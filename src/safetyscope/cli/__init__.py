"""Command-line interface (typer); see `safetyscope --help`."""
