"""Bad input, the config (`hf_gradmimic.config.coerce_field`): values from a JSON config are converted to the field's
type, or refused with a TypeError naming the field, the value and the type expected."""

from __future__ import annotations

import pytest

from bad_input import config


def test_config_values_from_a_json_config_are_coerced_or_named(tmp_path):
    args = config(
        tmp_path,
        mimic_temperature="0.5",
        mimic_warmup_steps="3",
        mimic_record_scores="false",
        mimic_bayesian_num_effective_data="1000",
    )
    assert (args.mimic_temperature, args.mimic_warmup_steps, args.mimic_record_scores) == (0.5, 3, False)
    assert args.mimic_bayesian_num_effective_data == 1000.0 and isinstance(args.mimic_temperature, float)
    with pytest.raises(TypeError, match=r"`mimic_temperature` must be a float; got 'hot' \(str\)"):
        config(tmp_path, mimic_temperature="hot")
    # Below 1e-30, m/τ overflowed float32: NaN weights, and the step skipped as if every sample were excluded.
    with pytest.raises(ValueError, match=r"`mimic_temperature` must be at least 1e-30.*got 1e-40"):
        config(tmp_path, mimic_temperature=1e-40)
    # The scorers' settings by their field names: a threshold of 1 excluded every sample, and trained nothing.
    for field, value, expected in (
        ("mimic_agra_threshold", 1.0, "a cosine threshold below 1"),
        ("mimic_agra_threshold", float("nan"), "a cosine threshold below 1"),
        ("mimic_bayesian_alpha", 2.0, r"in \[0, 1\]"),
        ("mimic_bayesian_momentum", 1.0, r"in \[0, 1\)"),
        ("mimic_bayesian_num_samples", 0, ">= 1"),
    ):
        with pytest.raises(ValueError, match=rf"`{field}` must be {expected}; got"):
            config(tmp_path, **{field: value})
    with pytest.raises(TypeError, match=r"`mimic_warmup_steps` must be an int; got 2.5 \(float\)"):
        config(tmp_path, mimic_warmup_steps=2.5)
    with pytest.raises(TypeError, match=r"`mimic_select_ratio` must be a float; got \[0.1\] \(list\)"):
        config(tmp_path, mimic_select_ratio=[0.1])


def test_string_values_are_coerced_after_an_argument_parser_resolved_the_fields(tmp_path):
    """transformers' HfArgumentParser replaces the dataclass fields' string annotations by types; a JSON config read
    afterwards (in the same process: the CLI, then a script) is still coerced."""
    from transformers import HfArgumentParser

    from hf_gradmimic import MimicConfig

    HfArgumentParser(MimicConfig)
    assert not isinstance(MimicConfig.__dataclass_fields__["mimic_temperature"].type, str)
    args = MimicConfig(
        output_dir=str(tmp_path),
        mimic_layers=["head"],
        mimic_temperature="0.25",
        mimic_max_nonfinite_steps="3",
        report_to=[],
        use_cpu=True,
    )
    assert args.mimic_temperature == 0.25 and args.mimic_max_nonfinite_steps == 3
