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
    with pytest.raises(TypeError, match=r"`mimic_warmup_steps` must be an int; got 2.5 \(float\)"):
        config(tmp_path, mimic_warmup_steps=2.5)
    with pytest.raises(TypeError, match=r"`mimic_select_ratio` must be a float; got \[0.1\] \(list\)"):
        config(tmp_path, mimic_select_ratio=[0.1])
