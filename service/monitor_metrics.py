"""Live-monitoring gauges on `/metrics` (issue 28, part 4): per version, live accuracy and
its Wilson 95 % bounds, labels, unlabelled and missing shares, the CBPE estimate, label
delay p50/p90 and the largest input PSI -- what `flywheel monitor` prints, for Prometheus.

Not computed on the scrape path: a background thread (`LiveMonitor`) builds the report
from the training store every `FLYWHEEL_LIVE_MONITOR_INTERVAL_S` (default 60 s) and keeps
the last one; the collector (`MonitorCollector`) only reads that copy, so a scrape costs the
same whatever the store holds, and a slow or absent store never slows a scrape or a
prediction. One refresh is `flywheel.review.live_report` over the window
(`FLYWHEEL_LIVE_MONITOR_WINDOW_S`) with at most `FLYWHEEL_LIVE_MONITOR_SAMPLE` rows per
version (its docstring gives the queries and their cost); the trusted drift reference is
read once and again every `REFERENCE_TTL_S`. The labels are the versions seen in the
window, so the series stay as few as the versions in use.

The refresh runs in the serving process and shares its GIL with the request threads: on
the 100,000-prediction store of docs/monitoring.md one refresh took 1.7-2.5 s (SQLite,
loaded 2-core machine), about 3-4 % of a core at the default 60 s. Raise the interval or
lower `FLYWHEEL_LIVE_MONITOR_SAMPLE` where that matters, or set the interval to 0 and run
`flywheel monitor --json` elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flywheel.settings import GateSettings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from flywheel.review import Reference

log = logging.getLogger(__name__)
REFERENCE_TTL_S = 3600.0  # the trusted data set changes only with a new lineage (init)
FIRST_REFRESH_MAX_S = 10.0  # the first report waits this long at most (not during startup)


class LiveMonitor:
    """Refreshes the live report in a daemon thread; `report` is the last one (None before
    the first, or while the store cannot be read).

    >>> from flywheel.settings import GateSettings
    >>> m = LiveMonitor(lambda: (None, "no store yet"), "flywheel",
    ...                 GateSettings(live_monitor_interval_s=0))
    >>> m.start().refresh(), m.report, m.note
    (False, None, 'no store yet')
    """

    def __init__(
        self,
        store: Callable[[], tuple[Engine | None, str | None]],
        model_name: str,
        gate: GateSettings,
    ) -> None:
        self._store = store
        self.model_name = model_name
        self.interval_s = gate.live_monitor_interval_s
        self.window_s = gate.live_monitor_window_s
        self.sample = gate.live_monitor_sample
        self.report: dict[str, Any] | None = None
        self.note: str | None = None
        self.refreshed_at: float | None = None  # time.time() of the last good report
        self.last_duration_s = 0.0
        self.failures = 0
        self._reference: Reference | None = None
        self._reference_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def start(self) -> LiveMonitor:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="flywheel-live-monitor", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        wait = min(self.interval_s, FIRST_REFRESH_MAX_S)
        while not self._stop.wait(wait):
            self.refresh()
            wait = self.interval_s

    def refresh(self) -> bool:
        """Build a new report now (the thread calls this); True if one was made. Never
        raises: a failure is logged, counted and the previous report kept."""
        from flywheel.review import live_report, load_reference
        from flywheel.store import session_factory

        engine, why = self._store()
        if engine is None:
            self.note = why
            return False
        start = time.perf_counter()
        try:
            now = time.monotonic()
            if self._reference is None or now - self._reference_at > REFERENCE_TTL_S:
                with session_factory(engine)() as session:
                    self._reference = load_reference(session, self.model_name, self.sample)
                self._reference_at = now
            self.report = live_report(
                engine,
                self.model_name,
                window_s=self.window_s,
                sample=self.sample,
                reference=self._reference,
            )
        except Exception as exc:  # the gauges keep their last values; the next try may work
            self.failures += 1
            self.note = f"live monitoring failed: {' '.join(str(exc).split())[:300]}"
            log.warning("%s", self.note)
            return False
        self.note = None
        self.refreshed_at = time.time()
        self.last_duration_s = time.perf_counter() - start
        return True


# (name, help, the version document's key); None values are left out
_GAUGES = (
    ("flywheel_live_accuracy", "Live accuracy on the labels of the window", "accuracy"),
    (
        "flywheel_live_accuracy_low",
        "Lower bound of the live accuracy's Wilson 95 % interval",
        "accuracy_low",
    ),
    (
        "flywheel_live_accuracy_high",
        "Upper bound of the live accuracy's Wilson 95 % interval",
        "accuracy_high",
    ),
    ("flywheel_live_labels", "Labelled predictions of the version in the window", "labelled"),
    (
        "flywheel_live_log_loss",
        "Mean log-loss on the labels of the window",
        "log_loss",
    ),
    (
        "flywheel_live_unlabelled_share",
        "Share of the predictions the version answered or scored in the window without a label yet",
        "unlabelled_share",
    ),
    (
        "flywheel_live_missing_share",
        "Share without a label among the predictions older than the p90 label delay",
        "missing_share",
    ),
    (
        "flywheel_live_cbpe_accuracy",
        "CBPE: accuracy the version's own confidence predicts on its unlabelled predictions",
        "cbpe_unlabelled",
    ),
    (
        "flywheel_live_cbpe_labelled",
        "Mean confidence on the labelled predictions (compare with flywheel_live_accuracy)",
        "cbpe_labelled",
    ),
)


class MonitorCollector:
    """The last report of a `LiveMonitor` as Prometheus gauges (read at scrape time,
    computed in the monitor's thread). Nothing while monitoring is off."""

    def __init__(self, monitor: LiveMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        from flywheel.review import MIN_PSI_ROWS

        m = self._monitor
        if not m.enabled:
            return
        yield CounterMetricFamily(
            "flywheel_live_monitor_failures",
            "Live-monitoring refreshes that failed (the gauges keep the last report)",
            value=m.failures,
        )
        report = m.report
        if report is None:
            return
        yield GaugeMetricFamily(
            "flywheel_live_monitor_refreshed_timestamp_seconds",
            "When the live-monitoring gauges were last computed (Unix time)",
            value=m.refreshed_at or 0.0,
        )
        yield GaugeMetricFamily(
            "flywheel_live_monitor_refresh_seconds",
            "How long the last live-monitoring refresh took",
            value=m.last_duration_s,
        )
        versions = report["versions"]
        for name, doc, key in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["version"])
            for v in versions:
                if v.get(key) is not None:
                    gauge.add_metric([v["version"]], float(v[key]))
            yield gauge
        delay = GaugeMetricFamily(
            "flywheel_live_label_delay_seconds",
            "Label delay (labelled_at - predicted_at) quantiles over the window",
            labels=["version", "quantile"],
        )
        psi = GaugeMetricFamily(
            "flywheel_live_max_psi",
            f"Largest PSI of a feature's recent inputs against the trusted data (at least "
            f"{MIN_PSI_ROWS} rows); 0.1 moderate, 0.25 major shift",
            labels=["version"],
        )
        for v in versions:
            for q, key in (("0.5", "p50_s"), ("0.9", "p90_s")):
                if v["label_delay"][key] is not None:
                    delay.add_metric([v["version"], q], float(v["label_delay"][key]))
            drift = v["drift"]
            if drift["max_psi"] is not None and drift["rows"] >= MIN_PSI_ROWS:
                psi.add_metric([v["version"]], float(drift["max_psi"]))
        yield delay
        yield psi
