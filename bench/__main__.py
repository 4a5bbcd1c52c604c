"""`python -m bench <name>`: one subcommand per benchmark module `bench/<name>.py`.

Each listed module exposes a typer-style `main` function and keeps its heavy imports
(torch, the service) inside functions, so listing the benchmarks stays fast. Adding a
benchmark is one module plus one name in BENCHMARKS.
"""

from __future__ import annotations

import importlib

import typer

BENCHMARKS = (
    "serve",
    "feedback",
    "hotswap",
    "freshness",
    "prequential",
    "elastic",
    "dpclip",
    "privacy",
    "batching",
    "cascade",
    "quant",
    "fedround",
    "fedaccuracy",
    "fedrobust",
    "init",
    "rejoin",
    "startup",
    "storage",
    "faults",
    "canary",
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Flywheel benchmarks (run from the repository root).",
)


@app.callback()
def _root() -> None:
    """Flywheel benchmarks; a callback keeps `serve` a subcommand even while it is alone."""


for _name in BENCHMARKS:
    app.command(_name)(importlib.import_module(f"bench.{_name}").main)


if __name__ == "__main__":
    app(prog_name="python -m bench")
