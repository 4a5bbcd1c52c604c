"""The synthetic demo problem, started the way a user starts theirs: a CSV and `init`.

When a process that needs a model (`flywheel serve`, `learn`, `demo`, a federated server)
finds neither a champion nor a trusted data set, it writes the synthetic seed data
(`flywheel.store.seed_data`: river's RandomRBF, features x0..x7, labels class_0..2) to
`FLYWHEEL_HOME/demo/` and imports it with `run_init`, as public data (it is synthetic).
Deterministic: the same `FLYWHEEL_SEED` writes the same file, which gives the same
schema, split, sample and weights.

Several processes may bootstrap one home at once (a service and a learner started
together): they take turns under the home's init lock, and the later ones find the
first one's champion.

A trusted set without a champion means an init committed its store writes but stopped
before moving the alias (or the registry was emptied): the version registered for that
set (same data and schema fingerprints) becomes champion; if there is none, the error
says how to start over.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from flywheel.learner.init.errors import ChampionExists, InitError
from flywheel.learner.init.pipeline import (
    INIT_APPROVAL,
    InitConfig,
    InitOptions,
    one_at_a_time,
    open_or_create_store,
    run_init,
)
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import PrivacySettings, TrustedSettings
from flywheel.store import TrustedInfo, session_factory, trusted_info

log = logging.getLogger(__name__)

LABEL = "label"
WAIT_FOR_OTHER_S = 60.0  # another process's init committed: wait this long for its alias


def write_demo_csv(trusted: TrustedSettings, folder: Path) -> Path:
    """The synthetic seed data as a CSV (x0..x7, label), written atomically; its path.

    >>> import tempfile, pathlib
    >>> from flywheel.settings import TrustedSettings
    >>> path = write_demo_csv(TrustedSettings(seed=1, seed_examples=100),
    ...                       pathlib.Path(tempfile.mkdtemp()))
    >>> lines = path.read_text().splitlines()
    >>> path.name, lines[0], len(lines)
    ('synthetic-seed1-100.csv', '"x0","x1","x2","x3","x4","x5","x6","x7","label"', 101)
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from flywheel.store import seed_data
    from flywheel.streams import LABELS

    x_tr, y_tr, x_ho, y_ho = seed_data(trusted)
    x = np.vstack([x_tr, x_ho])  # the sample's own order (seed_data cut it at 80 %)
    y = np.concatenate([y_tr, y_ho])
    columns = {f"x{i}": pa.array(x[:, i]) for i in range(x.shape[1])}
    columns[LABEL] = pa.array([LABELS[int(i)] for i in y])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-seed{trusted.seed}-{trusted.seed_examples}.csv"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pcsv.write_csv(pa.table(columns), tmp)
    os.replace(tmp, path)
    return path


def bootstrap_champion(trusted: TrustedSettings, registry: Registry) -> ModelVersion:
    """The champion; on a new deployment, the synthetic demo problem through `init`.

    Under the home's init lock, so that a service and a learner started together on a
    fresh home create the store and import the demo once: the second finds the first's
    champion.
    """
    current = registry.champion_version()
    if current is not None:
        return current
    state = registry.state
    with one_at_a_time(state.home_dir):
        current = registry.champion_version()
        if current is not None:
            return current
        engine = open_or_create_store(state.resolved_database_url)
        try:
            with session_factory(engine)() as session:
                info = trusted_info(session, registry.name)
        finally:
            engine.dispose()
        if info is not None:
            return _adopt(info, registry)
        log.info(
            "no champion of %s yet: training the first model on the synthetic demo data "
            "(%d rows; 4 s on a 2-core machine at load 20, with its imports about 25 s)",
            registry.name,
            trusted.seed_examples,
        )
        data = write_demo_csv(trusted, state.home_dir / "demo")
        config = InitConfig(
            state=state, trusted=trusted, privacy=PrivacySettings.model_validate({})
        )
        options = InitOptions(data=data, label=LABEL, public=True)
        try:
            result = run_init(options, config, registry, locked=True)
        except (ChampionExists, IntegrityError):
            # another machine's init on the same store got there first
            return _wait_for_champion(registry)
    log.info(
        "registered the synthetic demo model %s v%s (holdout accuracy %.3f)",
        registry.name,
        result.version,
        result.holdout_accuracy,
    )
    return result.version


def _adopt(info: TrustedInfo, registry: Registry) -> ModelVersion:
    """The version `init` registered for this trusted set becomes champion."""
    found = [
        v
        for v in registry.versions()
        if v.tags.get("source") == "init"
        and v.tags.get("data_fingerprint") == info.fingerprint
        and v.tags.get("schema_fingerprint") == info.schema.fingerprint()
    ]
    if not found:
        raise InitError(
            f"the store holds a trusted data set for {registry.name} (from {info.source}, "
            f"sha256 {info.fingerprint[:12]}...) but the registry has no version trained on "
            "it: run `flywheel init --new-lineage --data FILE --label COLUMN` to start over"
        )
    version = found[0].version  # newest first
    log.warning(
        "%s v%s was registered by an init that stopped before making it champion: "
        "making it champion now",
        registry.name,
        version,
    )
    registry.set_champion(version, approval=INIT_APPROVAL)
    return version


def _wait_for_champion(registry: Registry) -> ModelVersion:
    deadline = time.monotonic() + WAIT_FOR_OTHER_S
    while time.monotonic() < deadline:
        current = registry.champion_version()
        if current is not None:
            return current
        time.sleep(0.2)
    raise InitError(
        f"another process is starting {registry.name} (its trusted set is stored) but no "
        f"champion appeared within {WAIT_FOR_OTHER_S:.0f} s"
    )
