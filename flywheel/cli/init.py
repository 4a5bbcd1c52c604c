"""`flywheel init`: start a deployment from a labelled data set file (docs/init.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from flywheel.cli import app, settings_or_exit

CONSENT_QUESTION = (
    "May this data set be used without privacy accounting (it is public, or its people consented)?"
)


def interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command("init")
def init(
    data: Path = typer.Option(
        ..., "--data", help="The labelled data set: .csv, .tsv (optionally .gz), .parquet."
    ),
    label: str = typer.Option(..., "--label", help="The column that holds the label."),
    schema: Path | None = typer.Option(
        None, "--schema", help="A reviewed schema (from --write-schema) instead of inferring."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="logistic | mlp[:hidden=64x64,activation=relu,dropout=0.1] | "
        "embed_mlp[:embedding_dim=8,...] | factory=module:function[,key=value] | a JSON "
        "spec. Default: embed_mlp with categorical features, else mlp.",
    ),
    write_schema: Path | None = typer.Option(
        None, "--write-schema", help="Write the schema (JSON) here for review, and stop."
    ),
    schema_only: bool = typer.Option(
        False, "--schema-only", help="Print the inferred schema (JSON) and stop."
    ),
    public: bool | None = typer.Option(
        None,
        "--public/--private",
        help="Whether the data may be used without privacy accounting (public or "
        "consented data). Asked when neither is given and a person is at the terminal.",
    ),
    new_lineage: bool = typer.Option(
        False,
        "--new-lineage",
        help="Replace the deployment's lineage: new trusted set and schema, new champion.",
    ),
    max_vocabulary: int | None = typer.Option(
        None, "--max-vocabulary", min=1, max=1_000_000, help="Categories kept per column (1000)."
    ),
    ignore: list[str] = typer.Option(  # noqa: B006 (typer reads the default, never mutates it)
        [], "--ignore", help="A column to leave out (repeat the option for more)."
    ),
    chunk_rows: int = typer.Option(
        50_000, "--chunk-rows", min=100, max=10_000_000, help="Rows read and written at a time."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Import a data set as the trusted data, train and register the first version."""
    from flywheel.features import MAX_VOCABULARY
    from flywheel.learner import (
        InitConfig,
        InitError,
        InitOptions,
        Meter,
        infer_file_schema,
        load_schema_file,
        run_init,
    )
    from flywheel.store import SchemaNotCurrent

    if schema is not None and (ignore or max_vocabulary is not None):
        raise _fail(
            "--ignore and --max-vocabulary shape an inferred schema; with --schema, edit "
            'the schema file instead ("kind": "ignore", the vocabulary)'
        )
    if schema_only and write_schema is not None:
        raise _fail("--schema-only prints the schema; --write-schema writes it: pass one")
    settings = settings_or_exit()
    meter = Meter.for_terminal(quiet=quiet or as_json)
    try:
        reviewed = load_schema_file(schema, label) if schema is not None else None
        if schema_only or write_schema is not None:
            if reviewed is None:
                reviewed, counts = infer_file_schema(
                    data,
                    label,
                    max_vocabulary=max_vocabulary or MAX_VOCABULARY,
                    ignore=tuple(ignore),
                    chunk_rows=chunk_rows,
                    meter=meter,
                )
            text = reviewed.model_dump_json(indent=2) + "\n"
            if write_schema is None:
                typer.echo(text, nl=False)
                return
            _write(write_schema, text)
            kinds = ", ".join(f"{f.name}: {f.kind}" for f in reviewed.features)
            typer.echo(
                f"wrote {write_schema} ({kinds}); review it, then: flywheel init "
                f"--data {data} --label {label} --schema {write_schema}",
                err=True,
            )
            return
        if public is None:
            if not interactive():
                raise _fail(
                    "pass --public (the data may be used without privacy accounting: public "
                    "or consented) or --private; nobody is at a terminal to ask"
                )
            public = typer.confirm(CONSENT_QUESTION, default=False, err=True)
        options = InitOptions(
            data=data,
            label=label,
            public=public,
            schema=reviewed,
            model=model,
            new_lineage=new_lineage,
            max_vocabulary=max_vocabulary or MAX_VOCABULARY,
            ignore=tuple(ignore),
            chunk_rows=chunk_rows,
            meter=meter,
        )
        from flywheel.registry import Registry

        result = run_init(options, InitConfig.of(settings), Registry.of(settings))
    except InitError as exc:  # ChampionExists too: the command as given cannot run
        raise _fail(str(exc)) from None
    except SchemaNotCurrent as exc:
        raise _fail(str(exc), code=1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    replaced = f", replacing v{result.replaced}" if result.replaced else ""
    typer.echo(
        f"{settings.model_name} v{result.version} is champion{replaced}: {result.model_family}, "
        f"{result.rows_train} train / {result.rows_holdout} holdout rows, holdout accuracy "
        f"{result.holdout_accuracy:.3f} (train {result.train_accuracy:.3f}, "
        f"{result.epochs} epochs on {result.trained_on} rows); data sha256 "
        f"{result.data_fingerprint[:12]}..., "
        f"{'public' if result.public else 'private'}"
    )


def _write(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _fail(f"{path}: cannot be written ({exc.strerror or exc})") from None
