"""Data subjects, the privacy unit: the keyed hash of a subject id, and an example's unit.

A contract (imports no component): the service hashes a correction's `subject` at intake,
the feedback worker stores the unit on every example made from the correction, the learner
accounts ε per unit, and erasure (issue 30) deletes by it.

* `subject_key(raw, key)`: HMAC-SHA256 of the raw id under the platform secret
  (FLYWHEEL_SUBJECT_KEY), hex. Keyed, not a plain hash: subject ids are guessable (an
  email, a customer number), and a plain SHA-256 of one is re-identified by hashing
  candidates. Only this hash travels on Kafka (`CorrectionEvent.subject`) and reaches the
  store; the raw id lives in the service's memory for one request.
* `privacy_unit(subject, prediction_id)`: the unit an example is accounted under,
  `subject:<hash>` or, without a subject, `prediction:<id>` (one correction and the
  counterexamples derived from it). Stored on each example (`examples.privacy_unit`,
  indexed): erasing a subject is one indexed delete, `privacy_unit = 'subject:<hash>'`.
  Examples stored before migration 0013 have none; their unit stays their source, as it
  was when they were accounted (`flywheel.store.StoredExample.contributor`).

>>> key = "k" * 32
>>> h = subject_key("u-17", key)
>>> len(h), h == subject_key("u-17", key), h == subject_key("u-18", key)
(64, True, False)
>>> privacy_unit(h, "p-1") == "subject:" + h, privacy_unit(None, "p-1")
(True, 'prediction:p-1')
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from pydantic import StringConstraints

__all__ = [
    "MAX_SUBJECT",
    "SUBJECT_KEY_PATTERN",
    "SubjectId",
    "SubjectKey",
    "privacy_unit",
    "subject_key",
]

MAX_SUBJECT = 256  # characters of a raw subject id (an email is at most 254)
SUBJECT_KEY_PATTERN = r"^[0-9a-f]{64}$"
# a raw subject id as a client sends it: printable, no control characters (NUL included)
SubjectId = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=MAX_SUBJECT, strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]
# what Kafka and the store carry instead: the keyed hash, 64 lowercase hex digits
SubjectKey = Annotated[str, StringConstraints(pattern=SUBJECT_KEY_PATTERN)]


def subject_key(raw: str, key: str) -> str:
    """HMAC-SHA256 of `raw` (UTF-8) under `key`, hex: the subject as Flywheel keeps it."""
    return hmac.new(key.encode(), raw.encode(), hashlib.sha256).hexdigest()


def privacy_unit(subject: str | None, prediction_id: str) -> str:
    """The privacy unit of an example made from a correction: its subject, else its
    prediction (the correction and its counterexamples). At most 75 characters, within
    the ledger's unit column (80)."""
    if subject:
        return f"subject:{subject}"
    return f"prediction:{prediction_id}"
