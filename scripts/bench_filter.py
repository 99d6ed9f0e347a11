#!/usr/bin/env python
"""Scaling benchmark of Grad-Mimic's Stage-2 filter (`hf_gradmimic.build_filter`), which writes docs/filter_scaling.md.

Generates synthetic score logs with N samples x 5 epochs (one record per sample per epoch,
batches of 256, 70 % "clean" samples whose b*w is drawn around 1.3 and 30 % "noisy" ones around
0.7, sd 0.25; loss around 0.5 and 1.5, sd 0.5), written as Parquet shards in the score-log schema of `hf_gradmimic.score_log_io`, then
times ``build_filter(path, windows=5, engine=..., **FILTERS[name])`` in a fresh subprocess per (size, engine,
filter), so that peak RSS values do not mix: ``default`` is the library's default filter (the keep posterior over
the student's mean loss and margin and the reference's margin), ``paper`` the paper's (the mimic windows' votes, GMM split, Snorkel). The
child reports the wall time of the `build_filter` call (which includes lazy imports: scikit-learn, snorkel/torch)
and its process peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the interpreter, numpy,
pyarrow and those imports, and the pages of memory-mapped files the process has read).

With ``--engines`` naming ``duckdb`` or ``polars`` (when importable, e.g. from ``--engine-path``),
the (sample, window) group-by alone is also run in that engine over the same shards, for the
engine choice of `hf_gradmimic.filter.engines.outofcore`: its wall time, peak RSS and how many window
values differ from the streaming engine's.

Usage:
    python scripts/bench_filter.py                      # 10M, 24M, 50M and 128M, the default filter, streaming
    python scripts/bench_filter.py --sizes 1000000 --filters default,paper --engines streaming,memory
    python scripts/bench_filter.py --data-dir /tmp/hf_gradmimic_bench --no-doc --delete-data

The synthetic logs are cached in --data-dir (about 21 bytes per record on disk) and reused unless
--delete-data; the streaming engine spills to --spill-dir (about 25 bytes per record).
Writes docs/filter_scaling.md unless --no-doc.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compare_methods import write_report  # noqa: E402  (keeps the doc's hand-written comments)
from provenance import code_commit  # noqa: E402  (scripts/provenance.py, beside this file)

from hf_gradmimic.fileio import atomic_write  # noqa: E402
from hf_gradmimic.score_log_io import SCORE_TYPES, SCORES_DIRNAME  # noqa: E402

EPOCHS = 5
BATCH = 256
SHARD_ROWS = 2_000_000
CLEAN_FRACTION = 0.7
LOG_VERSION = (
    3  # of the synthetic log (2: the margin column; 3: the reference's); a cached log of another version is not reused
)


def generate(n: int, folder: Path, seed: int = 0) -> Path:
    """Write a synthetic score log for ``n`` samples x EPOCHS epochs under ``folder``; returns output_dir.

    Memory: the per-epoch permutation (8 bytes per sample) plus one shard's columns at a time.
    """
    output_dir = folder / f"v{LOG_VERSION}-n{n}"
    marker = output_dir / "COMPLETE"
    if marker.exists():
        return output_dir
    scores = output_dir / SCORES_DIRNAME
    scores.mkdir(parents=True, exist_ok=True)
    for old in scores.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < CLEAN_FRACTION
    np.save(output_dir / "clean.npy", clean)
    steps_per_epoch = -(-n // BATCH)
    last_batch = n - (steps_per_epoch - 1) * BATCH
    rows_per_shard = (SHARD_ROWS // BATCH) * BATCH  # shards cut at batch boundaries, named like ScoreWriter's
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, rows_per_shard):
            stop = min(n, start + rows_per_shard)
            position = np.arange(start, stop, dtype=np.int64)
            batch_index = position // BATCH
            batch_size = np.where(batch_index == steps_per_epoch - 1, last_batch, BATCH).astype(np.int32)
            ids = order[start:stop]
            is_clean = clean[ids]
            rows = stop - start
            bw = np.clip(np.where(is_clean, 1.3, 0.7) + rng.normal(0.0, 0.25, rows), 0.01, None)
            step = epoch * steps_per_epoch + batch_index + 1
            columns = {
                "global_step": step,
                "epoch": step / steps_per_epoch,
                "sample_id": ids.astype(np.int64),
                "mimic_score": (np.where(is_clean, 0.4, -0.4) + rng.normal(0.0, 0.3, rows)).astype(np.float32),
                "weight": (bw / batch_size).astype(np.float32),
                # The default filter also reads the loss (its "loss" labeling function): lower for clean samples.
                "loss": np.abs(np.where(is_clean, 0.5, 1.5) + rng.normal(0.0, 0.5, rows)).astype(np.float32),
                # And the margin (its "mean_margin" labeling function): higher for clean samples.
                "margin": (np.where(is_clean, 1.0, -0.5) + rng.normal(0.0, 1.0, rows)).astype(np.float32),
                # And the reference's margin (its "reference_margin"), drawn apart from the student's.
                "reference_margin": (np.where(is_clean, 1.0, -0.5) + rng.normal(0.0, 1.0, rows)).astype(np.float32),
                "batch_size": batch_size,
                "rank": np.zeros(rows, dtype=np.int32),
                "repeated": np.zeros(rows, dtype=bool),
                "status": np.zeros(rows, dtype=np.int8),
            }
            table = pa.table({name: pa.array(v, type=SCORE_TYPES.get(name, pa.int64())) for name, v in columns.items()})
            name = scores / f"rank00000-steps{int(step[0]):09d}-{int(step[-1]):09d}.parquet"
            atomic_write(name, functools.partial(pq.write_table, table))
        del order
    marker.touch()
    return output_dir


CHILD = r"""
import json, os, resource, sys, time
import numpy as np
sys.path[:0] = [{repo!r}, *{paths!r}]
t0 = time.perf_counter()
from hf_gradmimic.filter import build_filter
t_import = time.perf_counter() - t0
if {engine!r} == "ray":
    # A local cluster of this machine's cores, on loopback only; its workers inherit PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join([{repo!r}, *{paths!r}, os.environ.get("PYTHONPATH", "")])
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
t0 = time.perf_counter()
f = build_filter({path!r}, windows=5, engine={engine!r}, spill_dir={spill!r}, **{settings!r})
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = dict(wall=wall, import_time=t_import, peak_rss=peak, n_samples=f.summary["n_samples"],
           n_records=f.summary["n_records"], retained=f.summary["retained_fraction"],
           aggregate_used=f.summary["aggregate_used"], table_bytes=f.table.nbytes,
           labeling_functions=f.summary["settings"]["labeling_functions"])
if {save_values!r}:
    np.save({save_values!r}, f.window_values())
clean = np.load({clean!r})
from hf_gradmimic.metrics import compute_filter_metrics
m = compute_filter_metrics(f.keep, clean[f.sample_ids], keep_score=f.keep_log_odds)
out.update(discard_f1=m["discard_f1"])
import hashlib
out.update(digest=hashlib.sha256(b"".join(np.ascontiguousarray(c).tobytes() for c in (f.keep, f.keep_prob, f.keep_log_odds))).hexdigest())
print("RESULT " + json.dumps(out))
"""

# The (sample, window) group-by alone in an embedded engine: the mean b*w per cell, the filter's
# first step; window = (step - first) * 5 // span, as windows=5 cuts them.
ENGINE_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path[:0] = {paths!r}
glob, engine, spill = {glob!r}, {engine!r}, {spill!r}
t0 = time.perf_counter()
if engine == "duckdb":
    import duckdb
    con = duckdb.connect()
    con.execute("SET enable_progress_bar=false; SET threads=2; SET memory_limit='2GB'; SET preserve_insertion_order=false; SET temp_directory='" + spill + "'")
    first, last = con.execute("SELECT min(global_step), max(global_step) FROM read_parquet('" + glob + "')").fetchone()
    span = last - first + 1
    query = (
        "SELECT sample_id, (global_step - " + str(first) + ") * 5 // " + str(span) + " AS w, "
        "sum(CAST(weight AS DOUBLE) * batch_size) / count(*) AS v "
        "FROM read_parquet('" + glob + "') WHERE NOT repeated GROUP BY ALL"
    )
    cells = con.execute(query).fetchnumpy()
    ids, w, v = cells["sample_id"], cells["w"], cells["v"]
else:
    import polars as pl
    scan = pl.scan_parquet(glob).filter(~pl.col("repeated"))
    bounds = scan.select(pl.col("global_step").min().alias("a"), pl.col("global_step").max().alias("b")).collect()
    first, span = bounds["a"][0], bounds["b"][0] - bounds["a"][0] + 1
    cells = (scan.with_columns(w=(pl.col("global_step") - first) * 5 // span,
                               bw=pl.col("weight").cast(pl.Float64) * pl.col("batch_size"))
                 .group_by("sample_id", "w").agg(v=pl.col("bw").mean())
                 .collect(engine="streaming"))
    ids, w, v = cells["sample_id"].to_numpy(), cells["w"].to_numpy(), cells["v"].to_numpy()
values = np.full((int(ids.max()) + 1, 5), np.nan, dtype=np.float32)
values[ids, w] = v
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
reference = np.load({reference!r})
differ = int((~((values == reference) | (np.isnan(values) & np.isnan(reference)))).sum())
print("RESULT " + json.dumps(dict(wall=wall, peak_rss=peak, differ=differ, cells=int(values.size))))
"""


def run_child(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    lines = [line[line.index("RESULT ") :] for line in proc.stdout.splitlines() if "RESULT " in line]
    if not lines:
        raise RuntimeError(f"benchmark child printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def importable(module: str, paths: list[str]) -> bool:
    code = f"import sys; sys.path[:0] = {paths!r}; import {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# Issue 26's targets for the default filter on this 2-core machine: (samples, peak RSS GiB, wall s or None).
TARGETS = [(24_000_000, 3.0, 180.0), (50_000_000, 4.0, None), (128_000_000, 8.0, None)]

# The filters measured: name -> build_filter settings besides windows=5, the engine and the spill folder.
FILTERS = {
    "default": {},
    "paper": {"labeling_functions": ["mimic"], "method": "gmm", "aggregate": "snorkel"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000000,24000000,50000000,128000000", help="comma-separated sample counts")
    parser.add_argument("--filters", default="default,paper", help=f"comma-separated, of {', '.join(FILTERS)}")
    parser.add_argument(
        "--engines", default="streaming", help="streaming, memory, ray, duckdb, polars (comma-separated)"
    )
    parser.add_argument(
        "--engine-path", default="", help="extra sys.path entries (os.pathsep-separated) for ray/duckdb/polars"
    )
    parser.add_argument(
        "--compare-up-to",
        type=int,
        default=10_000_000,
        help="run memory, ray, duckdb, polars and the non-default filters only on sizes up to this many samples",
    )
    parser.add_argument("--data-dir", default="/tmp/hf_gradmimic_bench", help="where the synthetic logs are cached")
    parser.add_argument("--spill-dir", default=None, help="where the streaming engine spills (default: the data dir)")
    parser.add_argument("--delete-data", action="store_true", help="delete each generated log once measured")
    parser.add_argument("--doc", default=str(REPO / "docs" / "filter_scaling.md"))
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    engines = args.engines.split(",")
    paths = [p for p in args.engine_path.split(os.pathsep) if p]
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    spill = args.spill_dir or str(data_dir)

    rows, engine_rows, notes = [], [], []
    load_before = os.getloadavg()
    commit = code_commit()  # what is measured: the code as it stands when the run starts
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        output_dir = generate(n, data_dir)
        disk = sum(p.stat().st_size for p in (output_dir / SCORES_DIRNAME).glob("*.parquet"))
        print(
            f"[data] n={n:,}: {output_dir} ({disk / 2**30:.2f} GiB, ready in {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        reference = output_dir / "values.npy"
        compared = n <= args.compare_up_to
        # The memory engine holds every record (about 36 GiB at 128M x 5): only on the compared sizes.
        for engine in [e for e in engines if e == "streaming" or (e in ("memory", "ray") and compared)]:
            for method in [f for f in args.filters.split(",") if f == "default" or compared]:
                save = str(reference) if engine == "streaming" and not reference.exists() else ""
                load = os.getloadavg()[0]
                result = run_child(
                    CHILD.format(
                        repo=str(REPO),
                        paths=paths,
                        path=str(output_dir),
                        settings=FILTERS[method],
                        engine=engine,
                        spill=spill,
                        clean=str(output_dir / "clean.npy"),
                        save_values=save,
                    )
                )
                result.update(n=n, method=method, engine=engine, disk=disk, load=load)
                rows.append(result)
                print(
                    f"  {engine:9s} {method:9s} wall {result['wall']:7.1f}s  peak RSS {result['peak_rss'] / 2**30:5.2f} GiB  "
                    f"retained {result['retained']:.3f}  discard F1 {result['discard_f1']:.3f}",
                    flush=True,
                )
        for engine in [e for e in engines if e in ("duckdb", "polars") and compared]:
            if not importable(engine, paths):
                notes.append(f"{engine} was not importable: not measured.")
            elif not reference.exists():
                notes.append(f"{engine} needs the streaming engine in the same run (its values are the reference).")
            else:
                glob = str(output_dir / SCORES_DIRNAME / "*.parquet")
                result = run_child(
                    ENGINE_CHILD.format(paths=paths, glob=glob, engine=engine, spill=spill, reference=str(reference))
                )
                result.update(n=n, engine=engine)
                engine_rows.append(result)
                print(
                    f"  {engine:9s} group-by  wall {result['wall']:7.1f}s  peak RSS {result['peak_rss'] / 2**30:5.2f} GiB  "
                    f"differing cells {result['differ']:,} of {result['cells']:,}",
                    flush=True,
                )
        reference.unlink(missing_ok=True)
        if args.delete_data:
            shutil.rmtree(output_dir, ignore_errors=True)
    load_after = os.getloadavg()
    if not args.no_doc:
        write_doc(args, rows, engine_rows, notes, load_before, load_after, commit)


def _table(rows: list[dict]) -> str:
    lines = [
        "| samples | records | log on disk (GiB) | engine | filter | build_filter wall (s) | load at start | "
        "peak RSS (GiB) | result table (GiB) | retained | discard F1 |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['n_records']:,} | {r['disk'] / 2**30:.2f} | {r['engine']} | {r['method']} | "
            f"{r['wall']:.1f} | {r['load']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['table_bytes'] / 2**30:.2f} | "
            f"{r['retained']:.3f} | {r['discard_f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict]) -> str:
    lines = []
    for n, rss, wall in TARGETS:
        measured = [r for r in rows if r["n"] == n and r["engine"] == "streaming" and r["method"] == "default"]
        if not measured:
            lines.append(f"- {n:,} x {EPOCHS}: **not measured** in this run.{_projection(rows, n, rss)}")
        for r in measured:
            met = r["peak_rss"] / 2**30 <= rss and (wall is None or r["wall"] <= wall)
            goal = f"<= {rss} GiB" + (f" and <= {wall:.0f} s" if wall else "")
            lines.append(
                f"- {n:,} x {EPOCHS} (default filter): target {goal}; measured {r['peak_rss'] / 2**30:.2f} GiB, "
                f"{r['wall']:.0f} s (1-minute load {r['load']:.1f} at its start): **{'met' if met else 'MISSED'}**."
            )
    by_engine: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_engine.setdefault((r["n"], r["method"]), {})[r["engine"]] = r
    for (n, method), engines in sorted(by_engine.items()):
        if "streaming" in engines and len(engines) > 1:
            same = all(r["digest"] == engines["streaming"]["digest"] for r in engines.values())
            lines.append(
                f"- {n:,} x {EPOCHS} ({method}): keep, keep_prob and keep_log_odds identical on {', '.join(engines)}: "
                f"**{'yes' if same else 'NO'}** (SHA-256 of the three columns' bytes)."
            )
        if "ray" in engines and "streaming" in engines:
            ratio = engines["ray"]["wall"] / engines["streaming"]["wall"]
            lines.append(
                f"- ray at {n:,} x {EPOCHS} ({method}): within 2x of the streaming engine's time (issue 19); "
                f"measured {ratio:.2f}x ({engines['ray']['wall']:.0f} s): **{'met' if ratio <= 2 else 'MISSED'}**."
            )
    return "\n".join(lines) + "\n"


def _projection(rows: list[dict], n: int, rss: float) -> str:
    """A straight-line projection of peak RSS and log size to ``n`` samples from the measured streaming rows."""
    points = sorted({r["n"]: r for r in rows if r["engine"] == "streaming" and r["method"] == "default"}.items())
    if len(points) < 2:
        return ""
    sizes = np.array([p for p, _ in points], dtype=np.float64)
    peak = np.polyval(np.polyfit(sizes, [r["peak_rss"] / 2**30 for _, r in points], 1), n)
    disk = np.polyval(np.polyfit(sizes, [r["disk"] / 2**30 for _, r in points], 1), n)
    return (
        f" A straight line through the measured sizes projects a peak RSS of {peak:.1f} GiB "
        f"({'within' if peak <= rss else 'over'} the {rss} GiB target) and a log of {disk:.1f} GiB on disk."
    )


def _engine_table(engine_rows: list[dict]) -> str:
    if not engine_rows:
        return ""
    rows = "".join(
        f"| {r['n']:,} | {r['engine']} | {r['wall']:.1f} | {r['peak_rss'] / 2**30:.2f} | {r['differ']:,} of {r['cells']:,} |\n"
        for r in engine_rows
    )
    return (
        "\n## The group-by alone in an embedded engine\n\n"
        "The (sample, window) mean of b*w only (no identification, no LabelModel) over the same shards, each in a "
        "fresh process (DuckDB: 2 threads, memory_limit 2GB; Polars: streaming engine); *differing cells* counts "
        "the float32 window values that are not bit-identical to the streaming engine's.\n\n"
        "| samples | engine | wall (s) | peak RSS (GiB) | differing cells |\n|---:|---|---:|---:|---:|\n" + rows
    )


def write_doc(args, rows, engine_rows, notes, load_before, load_after, commit: str) -> None:
    cpu = platform.processor() or platform.machine()
    notes_text = "".join(f"Note: {note}\n" for note in notes)
    doc = f"""# Scaling of the Stage-2 filter

Generated by `python scripts/bench_filter.py --sizes {args.sizes} --filters {args.filters} --engines {args.engines}`
on {os.cpu_count()} CPU cores ({cpu}, Python {platform.python_version()}), shared with other jobs
(1-minute load average {load_before[0]:.1f} before the run and {load_after[0]:.1f} after it, and the load at the
start of each measurement in the table: wall times include waiting for a core). Library: hf_gradmimic at commit
{commit}. Do not edit by hand: rerun the script.

Synthetic score logs: N samples x {EPOCHS} epochs, one record per sample per epoch (batches of {BATCH}),
{int(CLEAN_FRACTION * 100)} % "clean" samples with b*w ~ N(1.3, 0.25) and the rest ~ N(0.7, 0.25), loss |N(0.5, 0.5)|
and |N(1.5, 0.5)|, the student's and the reference's margins each N(1, 1) and N(-0.5, 1), written as Parquet shards of about {SHARD_ROWS:,} rows in the
score-log schema (*log on disk* is their total size). Each row is one fresh subprocess running
`build_filter(path, windows=5, engine=<engine>, **settings)`, *filter* naming the settings:

- `default`: none, the library's default: the keep posterior (`aggregate="mixture"`) over the student's mean
  log-loss and mean margin and the reference's mean margin (`labeling_functions=["mean_loss", "mean_margin",
  "reference_margin"]`), then the agreement gate (a sample whose two mean margins are at least 0 is kept:
  `discard_requires_disagreement=True`); the mimic windows' k-means votes are computed and stored but do not vote.
  The synthetic margins are drawn apart from the losses and from each other, so the gate keeps the "noisy" samples
  whose two margins are at least 0, which lowers *discard F1* here;
- `paper`: `labeling_functions=["mimic"], method="gmm", aggregate="snorkel"` (Huang et al., Section 4.2), run on
  the sizes where the engines are compared.

*wall* is the `build_filter` call alone (reading the shards, grouping, identification, the fit, with its lazy
imports); *peak RSS* is the child process's `ru_maxrss`: the interpreter and libraries, and the pages of the
memory-mapped files it has read; for `ray` it is the driver's alone (the Ray workers are the raylet's children),
and *wall* excludes starting the local cluster (`ray.init`, on 127.0.0.1). *result table* is the filter's table
(`MimicFilter.table.nbytes`), most of it in memory-mapped files with the streaming engine. *discard F1* is against
the synthetic clean flags.

{_table(rows)}
Targets (issue 26), checked by this script:

{_targets(rows)}{_engine_table(engine_rows)}
{notes_text}
How memory is bounded (the streaming engine, `hf_gradmimic.filter.engines.outofcore`): the shards are read once,
one at a time, and each record's step, sample id, b*w, score, status and signal values (loss, the two margins) are appended
to the spill files of its sample-id range; each range is then reduced alone by the in-memory engine's own
functions, so the result is bit-identical to it. Every per-sample output of the reduction (window values and
scores, the signals' window means, ids, means, counts) goes to a file of the spill folder that is memory-mapped
at the end, not into the process's memory. The decision reads what it needs from them in row blocks
(`hf_gradmimic.filter.rowblocks`), releasing the mapping's pages after each block: one window column at a time
for its k-means split (scanned in blocks), and the signals' per-window means for the labeling functions, which
keep one float32 per sample and function. The keep posterior is fit on at most 500,000 sampled rows and applied
in chunks. The filter's table wraps the mapped outputs without a copy; its list columns of one width share one
offsets buffer. What grows with the pool in the process's own memory is then the decision's per-sample output:
the vote matrix (1 byte per window), the labeling functions' values (4 bytes each), keep_prob and keep_log_odds (8
each) and keep.
"""
    write_report(Path(args.doc), doc)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
