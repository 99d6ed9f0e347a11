"""What happens on bad input: each case asserts the behaviour (finite parameters, weight 0 and the flag in the log,
the error type with a message naming the thing at fault, nothing deleted), against independent oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.score_log_io import STATUS_NONFINITE, STATUS_SCORED, STATUS_UNLABELED

from tiny_models import (
    TinyMLP,
    lm_dataset,
    mlp_dataset,
    oracle_scores_from_grads,
    per_sample_grads,
    per_sample_lm_grads,
    tiny_gpt2,
)

COMMON = dict(learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
              report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
              mimic_alignment_check=False)


def config(tmp_path, **overrides) -> MimicConfig:
    return MimicConfig(output_dir=str(tmp_path), **{**COMMON, "per_device_train_batch_size": 16, "max_steps": 1, **overrides})


def head_reference(model, scale=0.5):
    generator = torch.Generator().manual_seed(1)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=generator)
            for n, p in model.named_parameters() if n.startswith("head.")}


def with_nan_rows(data, rows):
    x = np.asarray(data["x"]).copy()
    x[rows, 0] = np.nan
    import datasets

    return datasets.Dataset.from_dict({"x": x, "labels": np.asarray(data["labels"])}).with_format("torch")


# ---------------------------------------------------------------- non-finite samples


@pytest.mark.parametrize("scope, accumulation", [("all", 1), ("all", 2), ("layer", 1)])
def test_a_nan_sample_gets_weight_zero_and_no_gradient(tmp_path, scope, accumulation):
    """One sample with a NaN input: the update equals −Σ w_i g_i over the 15 other samples, w the softmax of their
    oracle scores (torch.func per-sample gradients); the sample is flagged, counted and named in a warning."""
    clean = mlp_dataset(n=16)
    data = with_nan_rows(clean, [3])
    model = TinyMLP()
    reference = head_reference(model)
    before = copy.deepcopy(model)
    good = [i for i in range(16) if i != 3]
    good_data = clean.select(good)
    names = [n for n, _ in before.named_parameters()]
    grads = per_sample_grads(before, good_data, names)
    scores = oracle_scores_from_grads({n: grads[n] for n in reference}, before, reference)
    weights = torch.softmax(torch.tensor(scores / 0.5), 0).float()

    args = config(tmp_path, mimic_layers=["head"], mimic_reweight_scope=scope,
                  per_device_train_batch_size=16 // accumulation, gradient_accumulation_steps=accumulation)
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=reference)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss or score.*ids \[3\]"):
        trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    for name, param in before.named_parameters():
        reweighted = scope == "all" or name.startswith("head.")
        step = torch.einsum("b,b...->...", weights, grads[name]) if reweighted else grads[name].mean(0)
        torch.testing.assert_close(after[name].detach(), param.detach() - step, rtol=1e-4, atol=1e-6, msg=name)

    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert table.loc[3, "status"] == STATUS_NONFINITE and table.loc[3, "weight"] == 0
    assert (table.drop(index=3).status == STATUS_SCORED).all()
    np.testing.assert_allclose(table.loc[good, "weight"].values, weights.numpy(), rtol=1e-4)
    assert trainer.nonfinite_guard.nonfinite_samples == 1
    logged = [entry for entry in trainer.state.log_history if "mimic/nonfinite_samples" in entry]
    assert logged[-1]["mimic/nonfinite_samples"] == 1
    assert np.isfinite(logged[-1]["loss"])  # the finite samples' mean, not 0 and not NaN


class OverflowOnToken(torch.nn.Module):
    """A sequence classifier whose activations overflow to inf for any sample containing token 7: a non-finite sample
    caused by its integer inputs, which no zeroing of floating-point inputs could repair."""

    def __init__(self):
        super().__init__()
        from tiny_models import TinySeq

        self.inner = TinySeq()

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = torch.tanh(self.inner.proj(self.inner.embed(input_ids)))
        hidden = hidden + torch.where((input_ids == 7).any(1), torch.inf, 0.0)[:, None, None]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.inner.head((hidden * mask).sum(1) / mask.sum(1)))


def test_a_sample_made_non_finite_by_its_token_ids_never_reaches_the_parameters(tmp_path):
    from tiny_models import seq_dataset

    data = seq_dataset(n=16)
    bad = [i for i in range(16) if 7 in data[i]["input_ids"].tolist()]
    assert 0 < len(bad) < 16
    model = OverflowOnToken()
    generator = torch.Generator().manual_seed(1)
    reference = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=generator)
                 for n, p in model.named_parameters() if n.startswith("inner.head.")}
    trainer = MimicTrainer(model=model, args=config(tmp_path, mimic_layers=["inner.head"]), train_dataset=data,
                           reference=reference)
    with pytest.warns(RuntimeWarning, match="non-finite loss or score"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert sorted(table.index[table.status == STATUS_NONFINITE]) == bad
    assert (table.loc[bad, "weight"] == 0).all()


def test_a_step_without_any_finite_sample_is_skipped_and_too_many_stop_training(tmp_path):
    """Every sample NaN: no parameter and no optimizer state changes (AdamW with weight decay would move the
    weights even with zero gradients); after mimic_max_nonfinite_steps such steps in a row, a clear error."""
    data = with_nan_rows(mlp_dataset(n=16), list(range(16)))
    model = TinyMLP()
    before = copy.deepcopy(model)
    args = config(tmp_path / "a", mimic_layers=["head"], per_device_train_batch_size=8, max_steps=2, optim="adamw_torch",
                  weight_decay=0.1, learning_rate=0.1, mimic_max_nonfinite_steps=3)
    trainer = MimicTrainer(model=model, args=args, train_dataset=data, reference=head_reference(model))
    with pytest.warns(RuntimeWarning, match="update was skipped"):
        trainer.train()
    for (name, p), (_, q) in zip(before.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name
    assert not trainer.optimizer.state  # AdamW never stepped a parameter
    assert trainer.nonfinite_guard.skipped == 2
    assert (load_scores(tmp_path / "a").to_pandas().status == STATUS_NONFINITE).all()

    args = config(tmp_path / "b", mimic_layers=["head"], per_device_train_batch_size=8, max_steps=4,
                  mimic_max_nonfinite_steps=2)
    trainer = MimicTrainer(model=TinyMLP(), args=args, train_dataset=data, reference=head_reference(model))
    with pytest.raises(RuntimeError, match=r"no sample had a finite loss for 2 optimizer steps in a row.*mimic_max_nonfinite_steps=2"):
        trainer.train()


def test_rows_without_a_supervised_label_get_weight_zero(tmp_path):
    """A prompt-only LM sample (every label -100) and one whose only label is the first token (nothing left after
    the causal shift) have loss 0 and no gradient: weight 0, status 'unlabeled', and the others keep the softmax of
    their oracle scores."""
    data = lm_dataset(n=8)
    labels = np.asarray(data["labels"]).copy()
    labels[2, :] = -100
    labels[5, 1:] = -100
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": np.asarray(data["input_ids"]), "labels": labels}).with_format("torch")
    model = tiny_gpt2(dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    reference = {"lm_head.weight": model.lm_head.weight.detach() + 0.1 * torch.randn(model.lm_head.weight.shape, generator=generator)}
    labelled = [i for i in range(8) if i not in (2, 5)]
    grads = per_sample_lm_grads(copy.deepcopy(model), data.select(labelled), ["lm_head.weight"])
    expected = torch.softmax(torch.tensor(oracle_scores_from_grads(grads, model, reference) / 0.5), 0).numpy()

    trainer = MimicTrainer(model=model, args=config(tmp_path, mimic_layers=["lm_head"], per_device_train_batch_size=8),
                           train_dataset=data, reference=reference)
    trainer.train()
    table = load_scores(tmp_path).to_pandas().set_index("sample_id")
    assert list(table.loc[[2, 5], "status"]) == [STATUS_UNLABELED, STATUS_UNLABELED]
    assert list(table.loc[[2, 5], "weight"]) == [0.0, 0.0]
    np.testing.assert_allclose(table.loc[labelled, "weight"].values, expected, rtol=1e-4)
    assert trainer.nonfinite_guard.unlabeled_samples == 2


# ---------------------------------------------------------------- sample ids and columns


@pytest.mark.parametrize("ids, error, message", [
    (["a", "b", "a", "c"] * 4, ValueError, r"'uid'.*duplicated id\(s\), e.g. \['a'"),
    ([[i, i] for i in range(16)], TypeError, r"'uid'.*non-scalar values \(List"),
    ([f"s{i}" for i in range(15)] + [None], ValueError, r"'uid'.*1 missing id\(s\).*rows \[15\]"),
    ([float(i) for i in range(15)] + [float("nan")], ValueError, r"'uid'.*1 missing id\(s\).*rows \[15\]"),
])
def test_bad_sample_ids_are_refused_at_construction(tmp_path, ids, error, message):
    data = mlp_dataset(n=16).add_column("uid", ids)
    model = TinyMLP()
    with pytest.raises(error, match=message):
        MimicTrainer(model=model, args=config(tmp_path, mimic_layers=["head"], mimic_id_column="uid"), train_dataset=data,
                     reference=head_reference(model))


class KwargsRecorder(TinyMLP):
    seen: set = set()

    def forward(self, x, labels=None, **kwargs):
        KwargsRecorder.seen.update(kwargs)
        return super().forward(x, labels)


def test_a_numeric_id_column_never_reaches_the_model(tmp_path):
    data = mlp_dataset(n=16).add_column("uid", list(range(100, 116)))
    model = KwargsRecorder()
    args = config(tmp_path, mimic_layers=["head"], mimic_id_column="uid", remove_unused_columns=False)
    MimicTrainer(model=model, args=args, train_dataset=data, reference=head_reference(model)).train()
    assert "uid" not in KwargsRecorder.seen
    assert sorted(load_scores(tmp_path)["sample_id"]) == list(range(100, 116))


def test_an_empty_train_dataset_is_refused_in_our_words(tmp_path):
    model = TinyMLP()
    with pytest.raises(ValueError, match="train_dataset is empty"):
        MimicTrainer(model=model, args=config(tmp_path, mimic_layers=["head"]), train_dataset=mlp_dataset(n=16).select([]),
                     reference=head_reference(model))


# ---------------------------------------------------------------- config values


def test_config_values_from_a_json_config_are_coerced_or_named(tmp_path):
    args = config(tmp_path, mimic_temperature="0.5", mimic_warmup_steps="3", mimic_record_scores="false",
                  mimic_bayesian_num_effective_data="1000")
    assert (args.mimic_temperature, args.mimic_warmup_steps, args.mimic_record_scores) == (0.5, 3, False)
    assert args.mimic_bayesian_num_effective_data == 1000.0 and isinstance(args.mimic_temperature, float)
    with pytest.raises(TypeError, match=r"`mimic_temperature` must be a float; got 'hot' \(str\)"):
        config(tmp_path, mimic_temperature="hot")
    with pytest.raises(TypeError, match=r"`mimic_warmup_steps` must be an int; got 2.5 \(float\)"):
        config(tmp_path, mimic_warmup_steps=2.5)
    with pytest.raises(TypeError, match=r"`mimic_select_ratio` must be a float; got \[0.1\] \(list\)"):
        config(tmp_path, mimic_select_ratio=[0.1])


# ---------------------------------------------------------------- references


def test_a_reference_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path):
    from hf_gradmimic.reference import ReferenceLoadError

    model = TinyMLP()
    reference = head_reference(model)
    reference["head.bias"][1] = float("inf")
    with pytest.raises(ReferenceLoadError, match=r"'head.bias'.*1 non-finite value"):
        MimicTrainer(model=model, args=config(tmp_path, mimic_layers=["head"]), train_dataset=mlp_dataset(n=16),
                     reference=reference)


def test_a_missing_local_looking_path_fails_at_once_naming_it(tmp_path, monkeypatch):
    import time

    from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors

    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").mkdir()
    for source in ("some_dir/reference.safetensors", "refs/probe", "./probe", "a/b/c"):
        started = time.monotonic()
        with pytest.raises(ReferenceLoadError, match=rf"Reference path {source} does not exist \(looked for .*not looked up on the Hub"):
            load_reference_tensors(source, ["head.weight"])
        assert time.monotonic() - started < 2.0, source  # no Hub round trips


def test_a_hub_lookup_failure_says_what_was_tried_and_names_offline_mode(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_gradmimic.reference import load_reference_tensors

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # configuration, as HF_HUB_OFFLINE=1 at import would set
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception) as caught:
        load_reference_tensors("my-org/probe-reference", ["head.weight"])
    message = str(caught.value)
    assert "looked for the reference 'my-org/probe-reference' as a local path" in message, message
    assert str(tmp_path / "my-org" / "probe-reference") in message and "HF_HUB_OFFLINE=1" in message


def test_a_corrupt_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from hf_gradmimic.reference import ReferenceLoadError, load_reference_tensors

    path = tmp_path / "reference.safetensors"
    save_file({"head.weight": torch.zeros(4, 16)}, str(path))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ReferenceLoadError, match=rf"Reference file {path} is not a readable safetensors file"):
        load_reference_tensors(path, ["head.weight"])
    with pytest.raises(ReferenceLoadError, match=rf"Reference file {path} is not a readable"):  # from its folder too
        load_reference_tensors(tmp_path, ["head.weight"])


def test_a_dict_of_numpy_arrays_is_a_reference(tmp_path):
    model = TinyMLP()
    reference = head_reference(model)
    args = config(tmp_path / "torch", mimic_layers=["head"])
    MimicTrainer(model=copy.deepcopy(model), args=args, train_dataset=mlp_dataset(n=16), reference=reference).train()
    args = config(tmp_path / "numpy", mimic_layers=["head"])
    as_numpy = {name: tensor.numpy() for name, tensor in reference.items()}
    MimicTrainer(model=copy.deepcopy(model), args=args, train_dataset=mlp_dataset(n=16), reference=as_numpy).train()
    np.testing.assert_allclose(load_scores(tmp_path / "numpy")["mimic_score"], load_scores(tmp_path / "torch")["mimic_score"])
    from hf_gradmimic.reference import ReferenceLoadError

    with pytest.raises(ReferenceLoadError, match=r"'head.weight' of the reference tensor dict is a list; expected a torch.Tensor"):
        MimicTrainer(model=model, args=config(tmp_path / "list", mimic_layers=["head"]), train_dataset=mlp_dataset(n=16),
                     reference={"head.weight": [[0.0]], "head.bias": [0.0]})


# ---------------------------------------------------------------- the score log


def test_a_fresh_run_in_a_used_output_dir_moves_the_earlier_log_aside(tmp_path):
    model = TinyMLP()
    args = config(tmp_path, mimic_layers=["head"], max_steps=2, per_device_train_batch_size=8)
    MimicTrainer(model=model, args=args, train_dataset=mlp_dataset(n=16), reference=head_reference(model)).train()
    first = load_scores(tmp_path).to_pandas()
    with pytest.warns(UserWarning, match=r"held a score log from an earlier run.*moved it to .*mimic_scores.previous-"):
        MimicTrainer(model=TinyMLP(seed=3), args=args, train_dataset=mlp_dataset(n=16, seed=5),
                     reference=head_reference(model)).train()
    (aside,) = tmp_path.glob("mimic_scores.previous-*")
    kept = load_scores(aside).to_pandas()
    np.testing.assert_array_equal(kept.mimic_score.values, first.mimic_score.values)  # nothing lost
    assert len(load_scores(tmp_path)) == 16  # the new run's own log


# ---------------------------------------------------------------- provenance and applying a filter


def _scored_run(tmp_path, **overrides):
    """A 2-epoch run on a 32-row dataset with a clean-flag column the trainer keeps from the model."""
    from hf_gradmimic import build_filter

    data = mlp_dataset(n=32).add_column("is_clean", [i % 3 != 0 for i in range(32)])
    model = TinyMLP()
    reference = head_reference(model)
    args = config(tmp_path, mimic_layers=["head"], per_device_train_batch_size=8, max_steps=8, **overrides)
    MimicTrainer(model=model, args=args, train_dataset=data, reference=reference).train()
    return data, reference, build_filter(tmp_path, method="threshold", aggregate="majority")


def test_the_score_log_records_its_provenance_and_the_filter_carries_it(tmp_path):
    import hashlib
    import json

    import hf_gradmimic

    _, reference, mimic_filter = _scored_run(tmp_path, mimic_temperature=0.25)
    recorded = json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    digest = hashlib.sha256()
    for name in sorted(reference):  # the hash of the reference tensors, computed here
        digest.update(name.encode())
        digest.update(reference[name].float().contiguous().numpy().tobytes())
    assert recorded["scorer"] == {"name": "mimic", "mode": "reweight", "score_terms": "full", "reference": {
        "source": "dict", "revision": None, "tensors_sha256": digest.hexdigest()}}
    assert recorded["mimic_layers"] == {"head": "head"} and recorded["temperature"] == 0.25
    assert recorded["hf_gradmimic_version"] == hf_gradmimic.__version__
    assert recorded["student"]["class"] == "TinyMLP"
    assert recorded["sample_ids"]["column"] is None and recorded["sample_ids"]["train_rows"] == 32
    assert mimic_filter.summary["provenance"] == recorded
    assert mimic_filter.rebuild(method="kmeans").summary["provenance"] == recorded


def test_provenance_travels_with_load_scores_to_the_filter_and_its_card(tmp_path):
    import json

    import datasets

    from hf_gradmimic import build_filter
    from hf_gradmimic.cards import dataset_card_data, render_dataset_card

    _, _, from_folder = _scored_run(tmp_path)
    recorded = json.loads((tmp_path / "mimic_scores" / "provenance.json").read_text())
    scores = load_scores(tmp_path)
    routes = {"load_scores": scores, "shuffled": scores.shuffle(seed=1), "selected": scores.select(range(len(scores) - 4)),
              "saved and reloaded": (scores.save_to_disk(str(tmp_path / "saved")), datasets.load_from_disk(str(tmp_path / "saved")))[1]}
    for route, log in routes.items():
        built = build_filter(log, method="threshold", aggregate="majority")
        assert built.summary["provenance"] == recorded == from_folder.summary["provenance"], route
    # Arrow and pandas carry no dataset info: no provenance rather than a wrong one.
    assert build_filter(scores.to_pandas(), method="threshold", aggregate="majority").summary["provenance"] is None
    # Two runs' logs concatenated hold two provenances: none is picked, and the warning says why.
    other = datasets.Dataset(scores.data.table, info=datasets.DatasetInfo(description=json.dumps(
        {"hf_gradmimic.provenance": {**recorded, "temperature": 9.0}})))
    with pytest.warns(UserWarning, match=r"provenance of several runs"):
        mixed = build_filter(datasets.concatenate_datasets([scores, other]), method="threshold", aggregate="majority")
    assert mixed.summary["provenance"] is None
    # The card of a filter built from load_scores names the reference by the hash the trainer recorded.
    loaded = build_filter(scores, method="threshold", aggregate="majority")
    card = render_dataset_card(dataset_card_data(None, "me/scored"), repo_id="me/scored", split="train",
                               mimic_filter=loaded, num_rows=32, num_kept=int(loaded.keep.sum()), has_filtered=True)
    assert f"sha256 `{recorded['scorer']['reference']['tensors_sha256'][:16]}…`" in card.text


def test_apply_refuses_a_reordered_dataset_and_accepts_the_same_rows_in_another_format(tmp_path):
    data, _, mimic_filter = _scored_run(tmp_path)
    kept = mimic_filter.apply(data)
    np.testing.assert_array_equal(np.asarray(kept["x"]), np.asarray(data["x"])[np.sort(mimic_filter.sample_ids[mimic_filter.keep])])
    # The same rows in another format, without a column, or as pandas: accepted, and the same rows kept.
    for same in (data.with_format(None), data.remove_columns(["is_clean"]), data.with_format(None).to_pandas()):
        assert len(mimic_filter.apply(same)) == len(kept)
    for reordered in (data.shuffle(seed=1), data.with_format(None).to_pandas().sample(frac=1.0, random_state=1)):
        with pytest.raises(ValueError, match=r"row indices of the training set \(32 rows\).*rows differ.*check_dataset=False"):
            mimic_filter.apply(reordered)
    assert len(mimic_filter.apply(data.shuffle(seed=1), check_dataset=False)) == len(kept)  # the user's call


def test_the_dataset_card_names_the_reference_without_the_caller_repeating_it(tmp_path):
    from hf_gradmimic.cards import dataset_card_data, render_dataset_card

    _, _, mimic_filter = _scored_run(tmp_path)
    card = render_dataset_card(dataset_card_data(None, "me/scored"), repo_id="me/scored", split="train",
                               mimic_filter=mimic_filter, num_rows=32, num_kept=int(mimic_filter.keep.sum()),
                               has_filtered=True)
    sha = mimic_filter.summary["provenance"]["scorer"]["reference"]["tensors_sha256"]
    assert f"sha256 `{sha[:16]}…`" in card.text
    assert "| temperature τ | 0.5 |" in card.text and "| mimic layers | `head` |" in card.text
    assert "| scorer | `mimic` (reweight, score terms: full) |" in card.text


def test_card_prose_written_by_hand_is_kept_and_our_section_updated_in_place():
    from hf_gradmimic.cards import CARD_SECTION_END, CARD_SECTION_START, merge_card_text

    hand = "# My dataset\n\nCollected by hand in 2026; see the paper.\n"
    first = merge_card_text(hand, "## Grad-Mimic\nfirst push")
    assert first.startswith(hand.rstrip()) and "first push" in first and first.count(CARD_SECTION_START) == 1
    edited = first + "\nA note the owner added later.\n"
    second = merge_card_text(edited, "## Grad-Mimic\nsecond push")
    assert "Collected by hand in 2026" in second and "A note the owner added later." in second
    assert "second push" in second and "first push" not in second
    assert second.count(CARD_SECTION_START) == 1 and second.count(CARD_SECTION_END) == 1
    assert merge_card_text(None, "only ours").strip() == f"{CARD_SECTION_START}\nonly ours\n{CARD_SECTION_END}"
