"""`python -m bench init`: rows per second and peak memory of `flywheel init` on a CSV.

A CSV of about `--size-mb` MB is generated (8 numeric and 4 categorical features, 3
labels, the serve benchmark's shape), then two processes read it, one after the other:

* the floor: pyarrow's own streaming reader (`pyarrow.csv.open_csv`, the same block size
  as init, types inferred by pyarrow), every batch read and dropped: the least any CSV
  import in Python can cost;
* `flywheel init --data FILE --label label --public --json`: two passes (schema, then
  encode + split + write every row to the store), the SHA-256, training on a bounded
  sample, publishing to a fresh SQLite MLflow registry.

Each is a child process so its peak resident memory (`ru_maxrss` from `wait4`) is its
own (started by a small launcher: a child forked from this large process would count
this process's pages too). Reported: rows/s of the floor; rows/s of init's two passes
(its `schema` + `import` phases, timed inside the command) and of the whole command
(process start, imports, training and publishing included); their ratios to the floor;
both peaks, and whether init stayed under `--max-rss-mb` (1 GB by default: the issue's
bound for a 1 GB file).

The store is a fresh SQLite file under the run's home unless `--database-url` names
another (a PostgreSQL URL: its database must be empty, or the import refuses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from bench.harness import document, load_range

NUMERIC = 8
CATEGORIES = {"country": 40, "device": 5, "merchant": 500, "channel": 3}
LABELS = ("ok", "review", "fraud")
GEN_ROWS = 200_000  # rows generated and written at a time

FLOOR = """
import sys, time, pyarrow.csv as pcsv
t = time.perf_counter()
rows = 0
block = int(sys.argv[2])
reader = pcsv.open_csv(sys.argv[1], read_options=pcsv.ReadOptions(block_size=block))
for batch in reader:
    rows += batch.num_rows
print(rows, time.perf_counter() - t)
"""


def generate(path: Path, size_mb: float, seed: int) -> int:
    """Write a CSV of at least `size_mb` MB; returns its rows. Memory: one block of rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    target = int(size_mb * 1e6)
    vocab = {name: np.array([f"{name[:2]}{i}" for i in range(n)]) for name, n in CATEGORIES.items()}
    weights = rng.normal(size=NUMERIC)
    effects = {name: rng.normal(size=n) for name, n in CATEGORIES.items()}
    rows = 0
    with pcsv.CSVWriter(path, _schema()) as writer:
        while path.stat().st_size < target or rows == 0:
            n = GEN_ROWS if target > 5e6 else 5_000
            x = rng.normal(size=(n, NUMERIC)).round(4)
            codes = {name: rng.integers(0, len(v), n) for name, v in vocab.items()}
            score = x @ weights + sum(effects[k][c] for k, c in codes.items())
            score += rng.normal(0, 0.5, n)
            y = np.digitize(score, np.quantile(score, [0.6, 0.85]))
            columns = {f"x{i}": pa.array(x[:, i]) for i in range(NUMERIC)}
            columns |= {name: pa.array(vocab[name][c]) for name, c in codes.items()}
            columns["label"] = pa.array(np.asarray(LABELS)[y])
            writer.write_table(pa.table(columns, schema=_schema()))
            rows += n
    return rows


def _schema() -> Any:
    import pyarrow as pa

    fields = [pa.field(f"x{i}", pa.float64()) for i in range(NUMERIC)]
    fields += [pa.field(name, pa.string()) for name in CATEGORIES]
    return pa.schema([*fields, pa.field("label", pa.string())])


# A child's ru_maxrss counts the pages it inherited when it was forked (fork, or vfork
# until exec), so a child of this process (torch and MLflow imported, or pytest's) would
# report this process's size. So each command is started by a fresh, small launcher,
# which forks it, waits for it and writes the command's own rusage to a file.
LAUNCH = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def run_child(args: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run a command to its end: its stdout, wall seconds and its own peak RSS (MB)."""
    with tempfile.TemporaryDirectory(prefix="bench-init-child-") as tmp:
        report = Path(tmp) / "rusage.json"
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", LAUNCH, str(report), *args],
                stdout=out,
                stderr=err,
                env=env,
                timeout=timeout_s,
            )
            wall = time.perf_counter() - started
        stdout, stderr = out_path.read_text(), err_path.read_text()
        result = json.loads(report.read_text()) if report.exists() else None
    if proc.returncode != 0 or result is None or result["code"] != 0:
        raise RuntimeError(f"{args[:4]} failed: {stderr[-2000:]}")
    return {"stdout": stdout, "wall_s": wall, "peak_rss_mb": result["maxrss_kb"] / 1024}


def main(
    size_mb: float = typer.Option(20.0, min=0.1, max=100_000, help="Size of the CSV (MB)."),
    database_url: str = typer.Option(
        "", help="The store (default: a fresh SQLite file under the run's home)."
    ),
    max_rss_mb: float = typer.Option(1024.0, min=1, help="Peak memory init must stay under."),
    chunk_rows: int = typer.Option(50_000, min=100, help="flywheel init --chunk-rows."),
    workdir: Path | None = typer.Option(None, help="Where the CSV and the home go (a temp dir)."),
    seed: int = typer.Option(7, help="Data seed."),
    timeout_s: float = typer.Option(3600.0, min=10, help="Longest one child may run."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """flywheel init on a generated CSV: rows/s and peak RSS against pyarrow's plain read."""
    from bench.harness import machine

    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-init-", dir=workdir) as tmp:
        root = Path(tmp)
        data = root / "data.csv"
        t = time.perf_counter()
        rows = generate(data, size_mb, seed)
        gen_s = time.perf_counter() - t
        size = data.stat().st_size
        print(f"generated {size / 1e6:.1f} MB, {rows} rows in {gen_s:.1f} s", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        from flywheel.learner.init.source import BLOCK_SIZE

        floor_args = [sys.executable, "-c", FLOOR, str(data), str(BLOCK_SIZE)]
        floor = run_child(floor_args, env, timeout_s)
        floor_rows, floor_read_s = floor["stdout"].split()
        assert int(floor_rows) == rows, (floor_rows, rows)
        home = root / "home"
        url = database_url or f"sqlite:///{home / 'flywheel.db'}"
        init_env = env | {
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_DATABASE_URL": url,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        args = [sys.executable, "-m", "flywheel", "init", "--data", str(data), "--label"]
        args += ["label", "--public", "--json", "--quiet", "--chunk-rows", str(chunk_rows)]
        run = run_child(args, init_env, timeout_s)
        result = json.loads(run["stdout"])
    phases = result["seconds"]
    passes_s = phases.get("schema", 0.0) + phases["import"]
    floor_rps = rows / float(floor_read_s)
    fields = {
        "seconds": time.perf_counter() - started,
        "config": {
            "size_mb": size / 1e6,
            "rows": rows,
            "columns": f"{NUMERIC} numeric, {len(CATEGORIES)} categorical, 1 label "
            f"({len(LABELS)} classes)",
            "store": "sqlite (fresh file)" if not database_url else url.split(":", 1)[0],
            "chunk_rows": chunk_rows,
            "generated_s": gen_s,
            "baseline": "pyarrow.csv.open_csv over the same file (same block size), batches "
            "read and dropped, in its own process",
        },
        "floor": {
            "read_s": float(floor_read_s),
            "rows_per_s": floor_rps,
            "process_wall_s": floor["wall_s"],
            "peak_rss_mb": floor["peak_rss_mb"],
        },
        "init": {
            "phases_s": phases,
            "passes_rows_per_s": rows / passes_s,
            "command_wall_s": run["wall_s"],
            "command_rows_per_s": rows / run["wall_s"],
            "peak_rss_mb": run["peak_rss_mb"],
            "trained_on": result["trained_on"],
            "holdout_accuracy": result["holdout_accuracy"],
            "rows_train": result["rows_train"],
            "rows_holdout": result["rows_holdout"],
        },
        "ratio": {
            "passes_vs_floor": (rows / passes_s) / floor_rps,
            "command_vs_floor": (rows / run["wall_s"]) / floor_rps,
            "peak_rss_vs_floor": run["peak_rss_mb"] / max(floor["peak_rss_mb"], 1e-9),
        },
        "peak_rss_under_limit": run["peak_rss_mb"] < max_rss_mb,
        "max_rss_mb": max_rss_mb,
    }
    doc = document("init", info, fields)
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"{size / 1e6:.0f} MB, {rows} rows, store {fields['config']['store']} "
        f"(load {load_range(info)})\n"
        f"  floor (pyarrow open_csv): {floor_rps:,.0f} rows/s, peak {floor['peak_rss_mb']:.0f} MB\n"
        f"  init, two passes:         {rows / passes_s:,.0f} rows/s "
        f"({fields['ratio']['passes_vs_floor']:.2f}x floor)\n"
        f"  init, whole command:      {rows / run['wall_s']:,.0f} rows/s "
        f"({run['wall_s']:.1f} s), peak {run['peak_rss_mb']:.0f} MB "
        f"({'under' if fields['peak_rss_under_limit'] else 'OVER'} {max_rss_mb:.0f} MB)\n"
        f"  phases: {phases}"
    )
