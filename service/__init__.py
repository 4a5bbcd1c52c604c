"""Service: the HTTP API, the served model and its hot swap, and prediction logging."""

from flywheel.service.app import create_app
from flywheel.service.config import ServiceConfig
from flywheel.service.event_log import EventLog
from flywheel.service.kafka_sink import KafkaSink
from flywheel.service.live import ROUTING_HEADER, LivePlan, LiveRouter
from flywheel.service.loading import load_champion
from flywheel.service.logging_setup import kafka_event_log
from flywheel.service.model_follower import ChampionSource, FollowerStats, ModelFollower
from flywheel.service.model_holder import ModelHolder, ModelNotReady, ServedModel, ServedSet
from flywheel.service.server import TLS, GracefulServer, StartupFailed, run_server
from flywheel.service.slow_clients import header_timeout_protocol
from flywheel.service.spool import Record, Spool, SpoolCorrupt, SpoolLocked

__all__ = [
    "ChampionSource",
    "EventLog",
    "FollowerStats",
    "GracefulServer",
    "KafkaSink",
    "LivePlan",
    "LiveRouter",
    "ModelFollower",
    "ModelHolder",
    "ModelNotReady",
    "ROUTING_HEADER",
    "Record",
    "ServedModel",
    "ServedSet",
    "ServiceConfig",
    "Spool",
    "SpoolCorrupt",
    "SpoolLocked",
    "StartupFailed",
    "TLS",
    "create_app",
    "header_timeout_protocol",
    "kafka_event_log",
    "load_champion",
    "run_server",
]
