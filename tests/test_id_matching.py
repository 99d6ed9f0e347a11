"""Matching a filter's ids with a dataset's id column (`hf_gradmimic.filter.matching`) never converts between
integers and strings, and a provenance file that is not a JSON object is named (`hf_gradmimic.score_log_io`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hf_gradmimic import build_filter
from hf_gradmimic.score_log_io import read_provenance


def int_id_filter(ids):
    n = len(ids)
    table = pa.table(
        {
            "global_step": np.ones(n, np.int64),
            "epoch": np.ones(n),
            "sample_id": np.asarray(ids, np.int64),
            "mimic_score": np.linspace(-1, 1, n).astype(np.float32),
            "weight": np.full(n, 1 / n, np.float32),
            "loss": np.ones(n, np.float32),
            "batch_size": np.full(n, n, np.int32),
            "rank": np.zeros(n, np.int32),
            "repeated": np.zeros(n, bool),
            "status": np.zeros(n, np.int8),
        }
    )
    return build_filter(table, method="threshold", aggregate="majority")


def test_int_ids_do_not_match_zero_padded_string_ids():
    mimic_filter = int_id_filter(range(100, 132))
    padded = pd.DataFrame({"uid": [f"{i:05d}" for i in range(100, 132)], "text": ["t"] * 32})
    with pytest.raises(
        ValueError,
        match=r"Column 'uid' holds string ids, the score log's sample_id int64.*'00100' "
        r"would match the integer 100",
    ):
        mimic_filter.apply(padded, id_column="uid")
    same_kind = pd.DataFrame({"uid": np.arange(100, 132, dtype=np.int32), "text": ["t"] * 32})  # int32: one kind
    assert len(mimic_filter.apply(same_kind, id_column="uid")) == int(mimic_filter.keep.sum())


@pytest.mark.parametrize("content, kind", [("[1, 2]", "list"), ('"text"', "str"), ("null", "NoneType")])
def test_a_provenance_file_that_is_not_an_object_is_named(tmp_path, content, kind):
    folder = tmp_path / "mimic_scores"
    folder.mkdir()
    (folder / "provenance.json").write_text(content)
    with pytest.raises(ValueError, match=rf"provenance file .*provenance.json holds a JSON {kind}, not an object"):
        read_provenance(tmp_path)
