"""The learner's hold on its lineage: take the lease, wait as a standby, renew, let go.

One learner per lineage writes (issue 27: two `flywheel learn` of one lineage trained 535
examples twice and lost ledger rows). The lease and its fencing token are the store's
(`flywheel.store.LeaseTable`); this keeps the learner's side of it: a standby waits,
logging once who holds the lineage, and takes over when the holder's lease runs out
(about FLYWHEEL_LEARN_LEASE_S after the holder died, at once after it stopped cleanly); a
holder renews in the background every FLYWHEEL_LEARN_LEASE_RENEW_S, so a long step keeps
it, and a renewal that finds a newer holder sets `lost`, which the training loop checks
between gradient steps.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.engine import Engine

from flywheel.retry import transient
from flywheel.store import Lease, LeaseLost, LeaseTable, default_owner

__all__ = ["LeaseKeeper", "StepAbandoned"]

log = logging.getLogger(__name__)


class StepAbandoned(Exception):
    """A stop was asked for in the middle of a step: nothing of it is published."""


class LeaseKeeper:
    """Takes and keeps one lineage's lease for one learner."""

    def __init__(
        self,
        engine: Engine,
        lineage: str,
        *,
        ttl_s: float,
        renew_s: float,
        owner: str | None = None,
    ) -> None:
        self.table = LeaseTable(engine, ttl_s=ttl_s)
        self.lineage = lineage
        self.owner = owner or default_owner()
        self.renew_s = renew_s
        self.lease: Lease | None = None
        self.lost = threading.Event()  # set by the renewal that found a newer holder
        self._renewing: threading.Thread | None = None
        self._stop_renewing = threading.Event()

    @property
    def held(self) -> bool:
        return self.lease is not None and not self.lost.is_set()

    def fence(self) -> Lease:
        """The lease every write of the learner carries; LeaseLost if it is not held."""
        if self.lease is None or self.lost.is_set():
            raise LeaseLost(f"{self.owner} does not hold the lease of {self.lineage}")
        return self.lease

    def try_take(self) -> bool:
        self.lease = self.table.try_acquire(self.lineage, self.owner)
        if self.lease is None:
            return False
        self.lost.clear()
        log.info(
            "learner %s holds the lease of %s (token %d, %g s, renewed every %g s)",
            self.owner,
            self.lineage,
            self.lease.token,
            self.table.ttl_s,
            self.renew_s,
        )
        return True

    def wait(self, stop: threading.Event | None = None, timeout_s: float | None = None) -> bool:
        """Take the lease, as a standby while another learner holds it (logged once, with
        who holds it); False if `stop` was set or `timeout_s` ran out first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        store_down = False
        while True:
            try:
                if self.try_take():
                    return True
                if not told:
                    holder = self.table.holder(self.lineage)
                    log.warning(
                        "learner %s is standby: the lease of %s is held by %s (token %d, "
                        "%.1f s left); taking over when it runs out",
                        self.owner,
                        self.lineage,
                        holder.owner if holder else "?",
                        holder.token if holder else 0,
                        holder.expires_in_s if holder else 0.0,
                    )
                    told = True
                if store_down:
                    log.info("learner %s: the store is back, still standing by", self.owner)
                    store_down = False
            except Exception as exc:
                # a standby waits out a store outage as the holder does (the fault suite:
                # a PostgreSQL kill made a standby, or a holder gone back to standby, exit)
                if not transient(exc):
                    raise
                if not store_down:
                    log.warning(
                        "learner %s standing by for %s: the store is unavailable (%s); "
                        "still waiting",
                        self.owner,
                        self.lineage,
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc,
                    )
                store_down = True
            pause = self.renew_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                pause = min(pause, left)
            if stop is not None:
                if stop.wait(pause):
                    return False
            else:
                time.sleep(pause)

    def start_renewing(self) -> None:
        """Renew in a background thread until `release` (or a newer holder: `lost`)."""
        if self._renewing is not None and self._renewing.is_alive():
            return
        self._stop_renewing.clear()
        self._renewing = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.lineage}", daemon=True
        )
        self._renewing.start()

    def _renew_loop(self) -> None:
        while not self._stop_renewing.wait(self.renew_s):
            lease = self.lease
            if lease is None:
                return
            try:
                lease.renew()
            except LeaseLost as exc:
                log.error("learner %s lost its lease: %s", self.owner, exc)
                self.lost.set()
                return
            except Exception as exc:  # the store is down: try again, the lease may run out
                log.warning("renewing the lease of %s failed (%s); retrying", self.lineage, exc)

    def stop_renewing(self) -> None:
        self._stop_renewing.set()
        if self._renewing is not None and self._renewing is not threading.current_thread():
            self._renewing.join(timeout=10)
        self._renewing = None

    def drop(self) -> None:
        """Forget a lease found lost (no release: it is another learner's now)."""
        self.stop_renewing()
        self.lease = None

    def release(self) -> None:
        """Let the lease go at once (a clean stop): a standby takes over at its next try."""
        self.stop_renewing()
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                lease.release()
                log.info("learner %s released the lease of %s", self.owner, self.lineage)
            except Exception as exc:  # it runs out by itself
                log.warning("releasing the lease of %s failed: %s", self.lineage, exc)
