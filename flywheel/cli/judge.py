"""`flywheel models judge`: each live pair's paired counts, evidence and verdict (issue 28).

For the reviewer: the shadow, the canary and the guard, each against the champion, as the
learner's live judge (learner/live.py) sees them. It only reads, unless `--act` is given:
then it records each new decision (tags `live_decision`, `live_evidence`, a
`live_decision` model event) and, when FLYWHEEL_AUTO_PROMOTE is on, acts on it (promote,
retire, roll back) as the learner would at its next FLYWHEEL_LIVE_JUDGE_INTERVAL_S. With
auto-promotion off, `--act` records the verdicts and moves nothing: an operator who turned
automatic moves off decides with `flywheel models promote` / `rollback`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from flywheel.cli import settings_or_exit, store_or_exit
from flywheel.cli.models import _console, _open, _registry_errors, models_app
from flywheel.cli.tables import print_table

if TYPE_CHECKING:
    from flywheel.learner import LiveVerdict


def _row(v: LiveVerdict) -> list[str]:
    e = v.evidence
    return [
        v.role,
        f"v{v.version}",
        f"v{v.champion}",
        str(e["labels"]),
        f"{e['candidate_only_right']} / {e['champion_only_right']}",
        f"{e['accuracy_difference']:+.4f}",
        f"{e['log_loss_difference']:+.4f}",
        f"{e['log_evidence']:.2f} / {e['threshold']:.2f}",
        v.would or "undecided",
        v.action,
    ]


@models_app.command()
def judge(
    act: bool = typer.Option(
        False,
        "--act",
        help="Record new decisions and, if FLYWHEEL_AUTO_PROMOTE is on, act on them.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Live pairs (shadow, canary, guard vs champion): paired counts, evidence, verdict."""
    from rich.table import Table

    from flywheel.learner import LiveJudge

    settings = settings_or_exit()
    engine = store_or_exit(settings)
    with _registry_errors(settings):
        registry = _open(settings)
        live = LiveJudge(
            settings.gate, settings.kafka, registry, engine, actor="flywheel-models-judge"
        )
        verdicts = live.step() if act else live.verdicts()
    if as_json:
        doc: dict[str, Any] = {
            "model_name": registry.name,
            "alpha": settings.live_alpha,
            "auto_promote": settings.auto_promote,
            "acted": act and settings.auto_promote,
            "pairs": [v.as_dict() for v in verdicts],
        }
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    if not verdicts:
        typer.echo(f"{registry.name}: no shadow, canary or guard beside the champion")
        return
    table = Table(title=f"live pairs of {registry.name} (alpha {settings.live_alpha})")
    for column in (
        "role",
        "version",
        "champion",
        "paired labels",
        "only it / only champion right",
        "accuracy diff",
        "log-loss diff",
        "log-evidence / needed",
        "verdict",
        "action",
    ):
        table.add_column(column)
    for v in verdicts:
        table.add_row(*_row(v))
    print_table(_console(), table)
    if not act:
        typer.echo("read only: --act records new decisions (and acts if auto-promote is on)")
