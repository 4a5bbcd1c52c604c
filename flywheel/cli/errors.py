"""Failures that come from outside the program end a command with one line.

A store, broker or registry that cannot be reached, a path that cannot be written: the
user needs to know which and why, not a traceback (whose locals would print URLs with
their passwords). Anything else is a bug and keeps its traceback, without locals.
"""

from __future__ import annotations

import sys

from flywheel.settings import mask_credentials


def describe_outside_error(exc: BaseException) -> str | None:
    """One line saying what outside the program failed; None if `exc` looks like a bug.

    Only modules already imported are consulted: an exception of a library that was never
    loaded cannot have been raised."""
    text: str | None = None
    sa = sys.modules.get("sqlalchemy.exc")
    kafka = sys.modules.get("kafka.errors")
    confluent = sys.modules.get("confluent_kafka")
    mlflow = sys.modules.get("mlflow.exceptions")
    if sa is not None and isinstance(exc, sa.SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        text = f"database: {orig if orig is not None else str(exc).splitlines()[0]}"
    elif (kafka is not None and isinstance(exc, kafka.KafkaError)) or (
        confluent is not None and isinstance(exc, confluent.KafkaException)
    ):
        text = f"Kafka: {exc}"
    elif mlflow is not None and isinstance(exc, mlflow.MlflowException):
        text = f"MLflow: {exc.message}"
    elif isinstance(exc, OSError):  # unreachable hosts, timeouts, paths
        text = str(exc) or type(exc).__name__
    if text is None:
        return None
    return mask_credentials(" ".join(text.split()))[:2000]
