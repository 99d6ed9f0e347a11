"""Stage 2 on a real local Ray cluster (issue 19, item 2): `build_filter(..., engine="ray")` equals the
single-machine engines. The cluster is started on 127.0.0.1 only (GCS, raylet and worker processes: no
mocks), bounded in time, and stopped at the end.

Ray is an optional extra: `make test` installs it (``.[ray]``) and sets GRADMIMIC_REQUIRE_RAY=1, so
that in CI a missing Ray fails these tests instead of skipping them."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pyarrow as pa
import pytest
from test_filter import corrupt_column_values
from test_filter_streaming import (
    assert_same_signals,
    assert_same_table,
    assert_same_windows,
    default_filter_log,
    random_log,
    write_resumed_log,
    write_shards,
)

from hf_gradmimic.filter import (
    AGGREGATES,
    METHODS,
    BadShardError,
    FilterWarning,
    LossWindows,
    build_filter,
    collect_windows,
    collect_windows_ray,
)
from hf_gradmimic.score_log_io import SCORES_DIRNAME

if importlib.util.find_spec("ray") is None:
    if os.environ.get("GRADMIMIC_REQUIRE_RAY") == "1":
        raise ImportError('GRADMIMIC_REQUIRE_RAY=1 but Ray is not installed: pip install -e ".[ray]" (make test does)')
    pytest.skip("Ray is not installed (the 'ray' extra)", allow_module_level=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster listening on 127.0.0.1 only, shut down after the module."""
    # GCS and raylet bind to the node IP; this keeps them (and the advertised address) on loopback.
    # Ray reads it when imported, so it is set first (nothing imports Ray before this fixture).
    previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    # Workers inherit this environment (PYTHONPATH included), so they import the same hf_gradmimic.
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous


def test_ray_reduction_equals_the_single_machine_one(ray_cluster, tmp_path):
    log_dir = write_shards(random_log(7), tmp_path)  # repeated rows, NaN scores, status 1 and 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        # 2 windows over 3+ epochs: cells of several records, whose sums depend on their order.
        local = collect_windows(log_dir, 2)
        distributed = collect_windows_ray(log_dir, 2, n_ranges=5)
    assert_same_windows(local, distributed)
    nodes = ray_cluster.nodes()
    assert len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == "127.0.0.1"


def test_ray_reduction_with_status_in_one_shard_only(ray_cluster, tmp_path):
    """Non-scored records (status 1 and 2) in the first shard only: a shard whose records are all scored has no status
    array, and a range mixes shards with and without one, or holds only scored records."""
    table, shard_rows = random_log(7), 700
    status = table.column("status").to_numpy()
    first_shard_only = np.where(np.arange(table.num_rows) < shard_rows, status, 0).astype(np.int8)
    assert (first_shard_only != 0).any()  # the seed's first shard holds non-scored records
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(first_shard_only, pa.int8()))
    log_dir = write_shards(table, tmp_path, rows=shard_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        local = collect_windows(log_dir, 2)
        distributed = collect_windows_ray(log_dir, 2, n_ranges=8)
    assert_same_windows(local, distributed)


@pytest.mark.parametrize("windows, sparse_ids", [(2, False), ("epoch", True)])
def test_ray_signals_equal_the_single_machine_ones_bit_for_bit(ray_cluster, tmp_path, windows, sparse_ids):
    # Repeated rows, status 1/2 records, NaN / inf / missing values in the loss, reference loss and margin.
    log_dir = write_shards(random_log(9, sparse_ids=sparse_ids, signals=True), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        local = collect_windows(log_dir, windows)
        distributed = collect_windows_ray(log_dir, windows, n_ranges=5)
    assert set(local.signals) == {"loss", "reference_loss", "reference_margin"} and local.nonfinite_signals
    assert_same_windows(local, distributed)
    assert_same_signals(local, distributed)
    assert [m for m in distributed.warnings if "signal column" in m] == [
        m for m in local.warnings if "signal column" in m
    ]


def test_ray_reads_shards_without_the_newer_columns(ray_cluster, tmp_path):
    as_one_table = write_resumed_log(random_log(6, signals=True), tmp_path, older_first=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        expected = collect_windows(as_one_table, 3)
        distributed = collect_windows_ray(tmp_path, 3, n_ranges=3)
    assert_same_windows(expected, distributed)
    assert_same_signals(expected, distributed)


def test_ray_filter_equals_for_every_method_and_aggregate(ray_cluster, tmp_path):
    log_dir = write_shards(random_log(3, sparse_ids=True), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        distributed = build_filter(
            log_dir, method="gmm", aggregate="snorkel", windows=3, engine="ray", labeling_functions=["mimic", "loss"]
        )
        for method in METHODS:
            for aggregate in AGGREGATES:
                # rebuild re-splits the mimic windows only; the loss windows keep the gmm split they were built with.
                local = build_filter(
                    log_dir,
                    method=method,
                    aggregate=aggregate,
                    windows=3,
                    engine="streaming",
                    labeling_functions=["mimic", LossWindows("gmm")],
                )
                assert_same_table(distributed.rebuild(method=method, aggregate=aggregate).table, local.table)
    # The default (the keep posterior over the signals) on the cluster equals the one on this machine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        assert_same_table(
            build_filter(log_dir, windows=3, engine="ray").table,
            build_filter(log_dir, windows=3, engine="memory").table,
        )
    # Fitted on the distinct vote patterns: each vote column (3 mimic windows, 3 loss windows) is -1, 0 or 1.
    n_columns = len(distributed.summary["windows"]) + len(distributed.summary["labeling_functions"])
    assert n_columns == 6 and distributed.summary["label_model"]["n_patterns"] <= 3**n_columns


def test_ray_names_a_bad_shard_and_skips_it_on_request(ray_cluster, tmp_path):
    log_dir = write_shards(random_log(1, extras=False), tmp_path)
    bad = sorted((log_dir / SCORES_DIRNAME).iterdir())[1]
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=str(bad)):
        build_filter(log_dir, engine="ray")
    with pytest.warns(FilterWarning, match="Skipped 1 unreadable"):
        skipped = build_filter(log_dir, method="threshold", engine="ray", on_bad_shard="skip")
    local = build_filter(log_dir, method="threshold", engine="memory", on_bad_shard="skip")
    np.testing.assert_array_equal(skipped.keep, local.keep)
    # A corrupt page under an intact footer is found by the Ray task that reads it, by the page's checksum (without
    # it, bytes changed mid-file read as other values, with no error), and comes back through pickling whole.
    bad.unlink()
    corrupt = sorted((log_dir / SCORES_DIRNAME).iterdir())[2]
    corrupt_column_values(corrupt, "loss")
    for engine in ("ray", "memory", "streaming"):
        with pytest.raises(BadShardError, match=rf"{corrupt.name} cannot be read.*CRC checksum") as raised:
            build_filter(log_dir, method="threshold", engine=engine)
        assert raised.value.path == corrupt
    with pytest.warns(FilterWarning, match=rf"Skipped 1 unreadable score-log shard.*{corrupt.name}"):
        skipped = build_filter(log_dir, method="threshold", engine="ray", on_bad_shard="skip")
    local = build_filter(log_dir, method="threshold", engine="memory", on_bad_shard="skip")
    np.testing.assert_array_equal(skipped.keep, local.keep)


def test_the_default_filter_is_identical_on_every_engine(ray_cluster, tmp_path, monkeypatch):
    default_filter_log(12, tmp_path)
    monkeypatch.setattr("hf_gradmimic.filter.engines.outofcore.DEFAULT_MEMORY_BUDGET", 40_000)  # spills
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FilterWarning)
        built = {engine: build_filter(tmp_path, windows=5, engine=engine) for engine in ("memory", "streaming", "ray")}
    assert built["memory"].summary["aggregate_used"] == "mixture"
    for engine in ("streaming", "ray"):
        np.testing.assert_array_equal(built[engine].keep_prob, built["memory"].keep_prob, err_msg=engine)
        np.testing.assert_array_equal(built[engine].keep_log_odds, built["memory"].keep_log_odds, err_msg=engine)
        np.testing.assert_array_equal(built[engine].keep, built["memory"].keep, err_msg=engine)
        assert_same_table(built[engine].table, built["memory"].table)
