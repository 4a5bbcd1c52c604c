"""The Python client of the Flywheel service: predictions and corrections, sync and async.

    from flywheel.client import Client

    with Client("http://flywheel:8000", api_key=KEY) as fw:
        result = fw.predict([{"amount": 12.5, "country": "FR"}])
        ...
        fw.correct([(result.predictions[0].id, "fraud")])

A contract-level package: it imports no component of Flywheel, only httpx (and, when they
are used, kafka-python for `KafkaCorrections` and `flywheel.events` for the correction
records; pandas and pyarrow objects are read without importing either). Usage, retries and
what a resend guarantees: docs/client.md.
"""

from flywheel.client.errors import (
    AuthError,
    BadRequest,
    FlywheelError,
    InvalidInput,
    Unavailable,
)
from flywheel.client.http import AsyncClient, Client
from flywheel.client.kafka import KafkaCorrections
from flywheel.client.retry import RetryPolicy
from flywheel.client.types import Correction, ModelInfo, ModelRef, Prediction, PredictResult

__all__ = [
    "AsyncClient",
    "AuthError",
    "BadRequest",
    "Client",
    "Correction",
    "FlywheelError",
    "InvalidInput",
    "KafkaCorrections",
    "ModelInfo",
    "ModelRef",
    "Prediction",
    "PredictResult",
    "RetryPolicy",
    "Unavailable",
]
