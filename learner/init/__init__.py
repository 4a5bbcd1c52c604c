"""`flywheel init`: a labelled data set file becomes a deployment's trusted data, its
reference statistics and its first model version. One job per module:

- `source.py`: the file, read in chunks (CSV via pyarrow's streaming reader, Parquet by
  batches), its header, its SHA-256;
- `columns.py`: a CSV's text columns typed (numbers or text), errors naming row and column;
- `split.py`: the stated, stratified split into trusted-train and the trusted holdout;
- `sample.py`: bounded uniform samples of the rows streamed past;
- `train.py`: training the initial model for any spec `init` accepts;
- `progress.py`: the progress bar;
- `pipeline.py`: the two passes, the one transaction, publishing (`run_init`);
- `bootstrap.py`: the synthetic demo problem through the same path (`ensure_champion`).
See docs/init.md.
"""

from flywheel.learner.init.bootstrap import bootstrap_champion, write_demo_csv
from flywheel.learner.init.errors import ChampionExists, InitError
from flywheel.learner.init.pipeline import (
    CHUNK_ROWS,
    MAX_EVAL,
    MAX_TRAIN,
    InitConfig,
    InitOptions,
    InitResult,
    infer_file_schema,
    load_schema_file,
    open_or_create_store,
    run_init,
)
from flywheel.learner.init.progress import Meter
from flywheel.learner.init.source import SUFFIXES, DataFile
from flywheel.learner.init.split import SPLIT_RULE

__all__ = [
    "CHUNK_ROWS",
    "MAX_EVAL",
    "MAX_TRAIN",
    "SPLIT_RULE",
    "SUFFIXES",
    "ChampionExists",
    "DataFile",
    "InitConfig",
    "InitError",
    "InitOptions",
    "InitResult",
    "Meter",
    "bootstrap_champion",
    "infer_file_schema",
    "load_schema_file",
    "open_or_create_store",
    "run_init",
    "write_demo_csv",
]
