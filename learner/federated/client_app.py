"""The customer side: a Flower ClientApp that trains on the site's own store.

Each `train` message carries the global model; the site reads its newest trainable
examples from its own training store (`FLYWHEEL_DATABASE_URL` of the site's process),
checks its own privacy budget (per source, in its own ledger, lineage
`<model>:federated`), takes DP-SGD steps from `flywheel.privacy`, clips the model update to
the server's bound and replies with the new weights and aggregate numbers only. Rows,
labels, example ids and source ids never leave the process: the reply is built from a
`LocalResult`, which holds none, and `records.outbound_guard` checks every reply.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flywheel.learner.federated.local import SiteData, read_site_data, train_locally
from flywheel.learner.federated.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    SPEC_KEY,
    WEIGHT_KEY,
    config_bytes,
    config_number,
    from_record,
    metric_record,
    outbound_guard,
    to_record,
)
from flywheel.settings import (
    FederatedSettings,
    PrivacySettings,
    RegistrySettings,
    Settings,
    StateSettings,
)

if TYPE_CHECKING:
    from flywheel.privacy import DPConfig, Mechanism

log = logging.getLogger(__name__)
KEY_CLIPPING_NORM = "clipping_norm"  # what Flower's client-side clipping wrapper sets


def site_dp_config(privacy: PrivacySettings, federated: FederatedSettings) -> DPConfig:
    """The site's DP-SGD: the privacy settings, at the federated sampling rate. At q = 1,
    σ doubles for the same ε against q = 0.5 but so do the sources in each step, so the
    private signal-to-noise ratio stays, while the public replay rows sent with the model
    no longer outweigh a small site's own data (`bench fedaccuracy`: +3 points). Always
    DP-SGD: a site samples; FLYWHEEL_PRIVACY_MECHANISM is the central learner's choice."""
    from flywheel.privacy import DPConfig

    return replace(
        DPConfig.from_settings(privacy),
        sample_rate=federated.fed_privacy_sample_rate,
        mechanism_kind="dp-sgd",
    )


class SiteBudgetRefused(RuntimeError):
    """This site's privacy budget does not allow it to train this round."""


@dataclass
class Site:
    """One customer site: its settings groups (store, model name, privacy budget, rounds)
    and its ledger. `Site.of(settings)` where the site's process starts."""

    state: StateSettings
    registry: RegistrySettings
    privacy: PrivacySettings
    federated: FederatedSettings

    @classmethod
    def of(cls, settings: Settings) -> Site:
        return cls(settings.state, settings.registry, settings.privacy, settings.federated)

    @cached_property
    def engine(self):  # noqa: ANN201  (sqlalchemy Engine)
        from flywheel.store import open_store

        return open_store(self.state.resolved_database_url)

    _mechanisms: dict[tuple[DPConfig, int], Mechanism] = field(default_factory=dict)

    def mechanism(self, dp: DPConfig, steps: int) -> Mechanism:
        """This site's DP-SGD mechanism for `steps` steps (σ calibrated once, then cached)."""
        key = (dp, steps)
        if key not in self._mechanisms:
            self._mechanisms[key] = dp.mechanism(steps)
        return self._mechanisms[key]

    def prewarm(self, steps: int | None = None) -> None:
        """Compute the accounting the next round needs (σ, and ε after one more round for
        each distinct history): `flywheel.privacy` caches both, so the round does not wait
        for them. Called when the site starts and after each round, off the round's path."""
        from flywheel.privacy import PrivacyLedger, epsilon

        if not self.privacy.privacy_enabled:
            return
        dp = site_dp_config(self.privacy, self.federated)
        mech = self.mechanism(dp, steps or self.federated.fed_local_steps)
        ledger = PrivacyLedger(self.engine)
        entries = ledger.entries(self.lineage)
        if not entries:
            epsilon([mech], dp.delta, dp.accountant)
            return
        last = entries[-1]
        epsilon(
            [*[e.mechanism for e in entries if e.update_no <= last.update_no], mech],
            dp.delta,
            dp.accountant,
        )

    @property
    def lineage(self) -> str:
        return f"{self.registry.model_name}:federated"

    def train(self, content: RecordDict) -> tuple[dict, dict[str, float]]:
        """One round on this site's data: (new state, aggregate metrics)."""
        from flywheel.modelspec import build_module, parse_spec
        from flywheel.privacy import BudgetRefused, PrivacyLedger, plan_update

        started = time.perf_counter()
        config: ConfigRecord = content.config_records[CONFIG]
        spec = parse_spec(json.loads(str(config[SPEC_KEY])))  # its schema included
        # a factory model is built only from a module this site trusts (its own setting)
        module = build_module(spec, factories=self.registry.factories)
        module.load_state_dict(from_record(content.array_records[ARRAYS]))
        labels = spec.label_index()
        s = self.federated
        # everything the server sent is checked before the site reads data or charges its
        # ledger: a bad round must not cost the site's sources any ε
        if not all(
            bool(torch.isfinite(v).all())
            for v in module.state_dict().values()
            if v.is_floating_point()
        ):
            raise ValueError("the server's model holds NaN or infinity")
        steps, lr, clip = round_config(config, s)
        public = public_rows(config, spec.input_dim, len(labels))
        # the site's own secret: a seed the server knew would let it subtract the DP noise
        seed = secrets.randbits(63)
        if s.fed_site_noise_seed is not None:
            log.warning("DP noise seeded by FLYWHEEL_FED_SITE_NOISE_SEED: experiments only")
            seed = s.fed_site_noise_seed * 1_000_003 + int(config_number(config, "server-round", 0))
        dp = site_dp_config(self.privacy, s) if self.privacy.privacy_enabled else None
        data = read_site_data(
            self.engine,
            labels,
            limit=s.fed_local_max_examples,
            max_per_source=dp.max_per_source if dp else None,
        )
        if len(data) == 0:
            raise SiteBudgetRefused("no trainable examples in this site's store")
        if len(data) < s.fed_min_site_examples:
            raise SiteBudgetRefused(
                f"{len(data)} trainable examples in this site's store, fewer than "
                f"FLYWHEEL_FED_MIN_SITE_EXAMPLES={s.fed_min_site_examples}"
            )
        mechanism, eps, delta = None, 0.0, 0.0
        if dp is not None:
            mechanism = self.mechanism(dp, steps)
            ledger = PrivacyLedger(self.engine)
            counts = {
                c: int(n)
                for c, n in zip(
                    data.contributors,
                    np.bincount(data.sources, minlength=len(data.contributors)),
                    strict=True,
                )
            }
            try:
                plan = plan_update(
                    ledger,
                    self.lineage,
                    counts,
                    mechanism,
                    budget=dp.epsilon,
                    delta=dp.delta,
                    accountant=dp.accountant,
                )
            except BudgetRefused as exc:
                raise SiteBudgetRefused(str(exc)) from None
            data = _only(data, set(plan.allowed))
            update = max((e.update_no for e in ledger.entries(self.lineage)), default=0) + 1
            ledger.record(
                {
                    "lineage": self.lineage,
                    "update_no": update,
                    "accountant": dp.accountant,
                    "engine": dp.engine,
                    "sample_rate": mechanism.sample_rate,
                    "noise_multiplier": mechanism.noise_multiplier,
                    "max_grad_norm": dp.max_grad_norm,
                    "steps": mechanism.steps,
                    "delta": dp.delta,
                    "epsilon_update": plan.epsilon_update,
                    "epsilon_lineage": plan.epsilon_lineage,
                    "sources": len(plan.allowed),
                    "examples": len(data),
                    "public_examples": 0,
                    "capped_examples": 0,
                    "excluded_examples": sum(counts[c] for c in plan.excluded),
                },
                {c: (counts[c], e) for c, e in plan.allowed.items()},
            )
            eps, delta = plan.epsilon_lineage, dp.delta
        result = train_locally(
            module,
            data,
            steps=steps,
            lr=lr,
            clip=clip,
            mechanism=mechanism,
            public=public,
            max_grad_norm=dp.max_grad_norm if dp else 1.0,
            seed=seed,
            engine=dp.engine if dp else "auto",
        )
        metrics = {
            "num-examples": result.examples,
            WEIGHT_KEY: 1.0,
            "sources": result.sources,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "train-seconds": time.perf_counter() - started,
            "local-epsilon": eps,
            "local-delta": delta,
            "dp": float(dp is not None),
            "clipped": float(result.clipped),
        }
        log.info(
            "round %s: %d examples from %d sources, loss %.3f, local ε %.3f",
            config.get("server-round"),
            result.examples,
            result.sources,
            result.loss,
            eps,
        )
        return result.state, metrics


def round_config(config: ConfigRecord, s: FederatedSettings) -> tuple[int, float, float]:
    """(local steps, learning rate, update clip) the server asks for, within what this
    site allows: at most FLYWHEEL_FED_LOCAL_STEPS steps (each step spends the site's ε),
    a finite positive rate and clip."""
    steps = int(config_number(config, "local-steps", s.fed_local_steps))
    if not 1 <= steps <= s.fed_local_steps:
        raise ValueError(
            f"the server asked for {steps} local steps; this site takes 1 to "
            f"{s.fed_local_steps} (FLYWHEEL_FED_LOCAL_STEPS)"
        )
    lr = config_number(config, "local-lr", s.fed_local_lr)
    if not (math.isfinite(lr) and 0 < lr <= 10):
        raise ValueError(
            f"the server asked for a local learning rate of {lr}; expected 0 < rate <= 10"
        )
    clip = config_number(config, "clip", s.fed_clip_norm)
    if KEY_CLIPPING_NORM in config:
        clip = min(clip, config_number(config, KEY_CLIPPING_NORM, clip))
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"the server asked for an update clip of {clip}; expected > 0")
    return steps, lr, clip


def public_rows(
    config: ConfigRecord, width: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The platform's public replay rows, if sent: as many labels as rows, every row
    `width` finite features, every label one of the model's."""
    if "public-x" not in config and "public-y" not in config:
        return None
    raw_x, raw_y = config_bytes(config, "public-x"), config_bytes(config, "public-y")
    if len(raw_x) % (4 * width) or len(raw_y) % 8:
        raise ValueError(
            "public rows: byte lengths do not fit float32 rows of the model's "
            "width and int64 labels"
        )
    px = np.frombuffer(raw_x, np.float32).reshape(-1, width).copy()
    py = np.frombuffer(raw_y, np.int64).copy()
    if len(px) != len(py):
        raise ValueError(f"public rows: {len(px)} rows but {len(py)} labels")
    if not np.isfinite(px).all():
        raise ValueError("public rows hold NaN or infinity")
    if len(py) and (py.min() < 0 or py.max() >= n_labels):
        raise ValueError(f"public rows: labels outside 0..{n_labels - 1}")
    return px, py


def _only(data: SiteData, allowed: set[str]) -> SiteData:
    keep = np.asarray([data.contributors[s] in allowed for s in data.sources], bool)
    return SiteData(data.x[keep], data.y[keep], data.w[keep], data.sources[keep], data.contributors)


_site: Site | None = None
_lock = threading.Lock()
_in_process: dict[int, Site] = {}  # node id -> site, for InProcessGrid (tests, benchmarks)


def current_site() -> Site:
    """The site of this process, from its FLYWHEEL_* environment (loaded once)."""
    global _site
    with _lock:
        if _site is None:
            from flywheel.settings import load_settings, prepare_home

            settings = load_settings()
            prepare_home(settings)
            _site = Site.of(settings)
        return _site


def reply_for(message: Message, site: Site) -> Message:
    state, metrics = site.train(message.content)
    return Message(
        RecordDict({ARRAYS: to_record(state), METRICS: metric_record(metrics)}), reply_to=message
    )


app = ClientApp(mods=[outbound_guard])


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train on this site's data; reply with the clipped update and aggregate metrics."""
    return reply_for(message, _in_process.get(context.node_id) or current_site())
