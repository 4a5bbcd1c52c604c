"""Feature schemas: named, categorical and boolean features, and how they become inputs.

`FeatureSchema` is the contract of a lineage: what `init` inferred (and the user
reviewed) from the data set, stored in every version's artifact. `infer_schema` reads a
data set's pyarrow batches in one pass; `encode_rows` (service) and `encode_table`
(import, clients) turn named rows into the model's raw input vectors.
"""

from flywheel.features.infer import infer_schema
from flywheel.features.schema import (
    FORMAT,
    MAX_VOCABULARY,
    UNKNOWN,
    Encoded,
    Feature,
    FeatureError,
    FeatureSchema,
    RowEncoder,
    label_text,
)

__all__ = [
    "FORMAT",
    "MAX_VOCABULARY",
    "UNKNOWN",
    "Encoded",
    "Feature",
    "FeatureError",
    "FeatureSchema",
    "RowEncoder",
    "infer_schema",
    "label_text",
]
