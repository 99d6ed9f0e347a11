#!/usr/bin/env python
"""Scaling benchmark of Grad-Mimic's Stage-2 filter (`hf_gradmimic.build_filter`).

Generates synthetic score logs with N samples x 5 epochs (one record per sample per epoch,
batches of 256, 70 % "clean" samples whose b*w is drawn around 1.3 and 30 % "noisy" ones around
0.7, sd 0.25), written as Parquet shards in the score-log schema of `hf_gradmimic.scores`, then
times ``build_filter(path, method=..., aggregate="snorkel", windows=5)`` in a fresh subprocess per
(size, method), so that peak RSS values do not mix. The child reports the wall time of the
`build_filter` call (which includes the lazy import of snorkel/torch) and its process peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the interpreter, numpy, pyarrow and
torch baseline).

Usage:
    python scripts/bench_filter.py                      # 1M and 10M, methods gmm and threshold
    python scripts/bench_filter.py --sizes 1000000 --methods gmm,kmeans,threshold,topk
    python scripts/bench_filter.py --data-dir /tmp/hf_gradmimic_bench --no-doc

The synthetic logs are cached in --data-dir (about 21 bytes per record on disk) and reused.
Writes a Markdown table to docs/filter_scaling.md unless --no-doc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_gradmimic.fileio import atomic_write  # noqa: E402
from hf_gradmimic.scores import SCORES_DIRNAME, SCORE_TYPES  # noqa: E402

EPOCHS = 5
BATCH = 256
SHARD_ROWS = 2_000_000
CLEAN_FRACTION = 0.7


def generate(n: int, folder: Path, seed: int = 0) -> Path:
    """Write a synthetic score log for ``n`` samples x EPOCHS epochs under ``folder``; returns output_dir."""
    output_dir = folder / f"n{n}"
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
    position = np.arange(n, dtype=np.int64)
    batch_index = position // BATCH
    batch_size = np.where(batch_index == steps_per_epoch - 1, n - (steps_per_epoch - 1) * BATCH, BATCH).astype(np.int32)
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        is_clean = clean[order]
        bw = np.where(is_clean, 1.3, 0.7) + rng.normal(0.0, 0.25, n)
        np.clip(bw, 0.01, None, out=bw)
        step = epoch * steps_per_epoch + batch_index + 1
        columns = {
            "global_step": step,
            "epoch": step / steps_per_epoch,
            "sample_id": order.astype(np.int64),
            "mimic_score": (np.where(is_clean, 0.4, -0.4) + rng.normal(0.0, 0.3, n)).astype(np.float32),
            "weight": (bw / batch_size).astype(np.float32),
            "loss": rng.random(n, dtype=np.float32),
            "batch_size": batch_size,
            "rank": np.zeros(n, dtype=np.int32),
            "repeated": np.zeros(n, dtype=bool),
        }
        # Shards cut at batch boundaries, named like ScoreWriter's.
        rows_per_shard = (SHARD_ROWS // BATCH) * BATCH
        for start in range(0, n, rows_per_shard):
            sl = slice(start, min(n, start + rows_per_shard))
            table = pa.table(
                {
                    name: pa.array(values[sl], type=SCORE_TYPES.get(name, pa.int64()))
                    for name, values in columns.items()
                }
            )
            first, last = int(step[sl][0]), int(step[sl][-1])
            pq.write_table(table, scores / f"rank00000-steps{first:09d}-{last:09d}.parquet")
    marker.touch()
    return output_dir


CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
from hf_gradmimic.filter import build_filter
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
f = build_filter({path!r}, method={method!r}, aggregate="snorkel", windows=5)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = dict(wall=wall, import_time=t_import, peak_rss=peak, n_samples=f.summary["n_samples"],
           n_records=f.summary["n_records"], retained=f.summary["retained_fraction"],
           aggregate_used=f.summary["aggregate_used"], label_model=f.summary["label_model"])
clean = np.load({clean!r})
try:
    from hf_gradmimic.metrics import compute_filter_metrics
    m = compute_filter_metrics(f.keep, clean[f.sample_ids], keep_prob=f.keep_prob)
    out.update(discard_f1=m["discard_f1"], discard_precision=m["discard_precision"], discard_recall=m["discard_recall"])
except ImportError as error:
    out.update(metrics_error=str(error))
print("RESULT " + json.dumps(out))
"""


def run_child(output_dir: Path, method: str) -> dict:
    code = CHILD.format(repo=str(REPO), path=str(output_dir), method=method, clean=str(output_dir / "clean.npy"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated sample counts")
    parser.add_argument("--methods", default="gmm,threshold", help="comma-separated identification methods")
    parser.add_argument("--data-dir", default="/tmp/hf_gradmimic_bench", help="where the synthetic logs are cached")
    parser.add_argument("--doc", default=str(REPO / "docs" / "filter_scaling.md"))
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")

    rows = []
    load_before = os.getloadavg()
    for n in sizes:
        t0 = time.perf_counter()
        output_dir = generate(n, Path(args.data_dir))
        size_on_disk = sum(p.stat().st_size for p in (output_dir / SCORES_DIRNAME).glob("*.parquet"))
        print(f"[data] n={n:,}: {output_dir} ({size_on_disk / 2**20:.0f} MiB, ready in {time.perf_counter() - t0:.1f}s)", flush=True)
        for method in methods:
            result = run_child(output_dir, method)
            result.update(n=n, method=method, disk=size_on_disk)
            rows.append(result)
            print(
                f"  {method:9s} wall {result['wall']:7.1f}s  peak RSS {result['peak_rss'] / 2**30:5.2f} GiB  "
                f"retained {result['retained']:.3f}  discard F1 {result.get('discard_f1', float('nan')):.3f}",
                flush=True,
            )

    header = (
        "| samples | records | method | build_filter wall (s) | peak RSS (GiB) | retained | discard F1 | LabelModel fit rows |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['n']:,} | {r['n_records']:,} | {r['method']} | {r['wall']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
        f"{r['retained']:.3f} | {r.get('discard_f1', float('nan')):.3f} | "
        f"{r['label_model']['fit_rows']:,}{'' if r['label_model']['exact'] else ' (proportional)'} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    load_after = os.getloadavg()
    print()
    print(table)
    if not args.no_doc:
        cpu = platform.processor() or platform.machine()
        doc = f"""# Scaling of the Stage-2 filter

Measured with `python scripts/bench_filter.py --sizes {args.sizes} --methods {args.methods}`
on {os.cpu_count()} CPU cores ({cpu}, Python {platform.python_version()}), shared with other jobs
(1-minute load average {load_before[0]:.1f} before the run and {load_after[0]:.1f} after it, so
wall times include waiting for a core).

Synthetic score logs: N samples x {EPOCHS} epochs, one record per sample per epoch (batches of {BATCH}),
{int(CLEAN_FRACTION * 100)} % "clean" samples with b*w ~ N(1.3, 0.25) and the rest ~ N(0.7, 0.25), written as
Parquet shards of about {SHARD_ROWS:,} rows in the score-log schema. Each row is one fresh subprocess
running `build_filter(path, method=<method>, aggregate="snorkel", windows=5)`:

- *wall* is the `build_filter` call alone (reading the shards, grouping, identification, the
  LabelModel fit, which includes importing snorkel/torch lazily, about 3 s);
- *peak RSS* is the child process's `ru_maxrss`, so it includes the interpreter, numpy, pyarrow and torch.

{table}
Target: 10M samples x 5 windows in at most 120 s and 4 GB on 2 cores.

`topk` runs with its default `topk=50` (keep the top half of every window) while 70 % of the
synthetic samples are clean, hence its lower F1; the other methods need no such prior.

How it scales: the shards are read one at a time into compact numpy arrays (int64 sample id and
step, float32 b*w and score: 24 bytes per record), grouped with `numpy.bincount` over the key
`sample * windows + window`, then each window is identified on its (n,) values (a sort for
k-means/GMM initialisation, vectorised EM) and the LabelModel is fitted on the distinct vote
patterns (at most 3^5 = 243), each repeated in proportion to its count up to 1M rows (exact
counts below 1M samples; see `aggregate_votes`), and predicted once per pattern. On a 3M x 5 vote
matrix the proportional 1M-row fit gave keep probabilities within 2e-5 of the exact fit on all
3M rows, with no decision changed (the exact fit took 7.3 s there and grows linearly with n).
GMM's EM runs on 4096 equal-count groups of each window's sorted values (exact EM below 4096
values; see `fit_gmm_1d`).
"""
        doc_path = atomic_write(args.doc, lambda tmp: Path(tmp).write_text(doc, encoding="utf-8"))
        print(f"wrote {doc_path}")


if __name__ == "__main__":
    main()
