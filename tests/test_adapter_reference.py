"""PEFT adapters as references: a folder or a Hub repo (loopback server, real clients), only its two files read."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from test_lora import TRAIN

from hf_gradmimic import MimicConfig, MimicTrainer, load_scores
from hf_gradmimic.reference import load_reference_tensors, read_reference_metadata
from hf_gradmimic.reference.adapters import AdapterReferenceError, without_adapter_name

from tiny_models import lm_dataset, lora_names, lora_student, oracle_scores_from_grads, per_sample_lm_grads, tiny_llama

peft = pytest.importorskip("peft")

BASE = "org/tiny-llama"


def student_and_reference_adapter(folder: Path, base: str = BASE):
    """The student (fresh LoRA, B = 0) and, saved by PEFT in ``folder``, a reference adapter: the same adapter moved
    away from the student's values (as if trained), with ``base`` as its base checkpoint."""
    student = lora_student()
    student.config._name_or_path = BASE
    reference = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    reference.peft_config["default"].base_model_name_or_path = base
    reference.save_pretrained(folder)
    return student, reference


def expected_scores(student, reference) -> np.ndarray:
    names = lora_names(student)
    wanted = {name: dict(reference.named_parameters())[name].detach() for name in names}
    return oracle_scores_from_grads(
        per_sample_lm_grads(copy.deepcopy(student), lm_dataset(n=16), names), student, wanted
    )


def train(student, output_dir: Path, source: str) -> np.ndarray:
    args = MimicConfig(
        output_dir=str(output_dir),
        mimic_layers=["lora"],
        mimic_reference=source,
        per_device_train_batch_size=16,
        **TRAIN,
    )
    MimicTrainer(model=student, args=args, train_dataset=lm_dataset(n=16)).train()
    table = load_scores(output_dir).to_pandas().sort_values("sample_id")
    return table.mimic_score.to_numpy()


def test_peft_saves_keys_without_the_adapter_name(tmp_path):
    """What the loader relies on, checked on PEFT's own save rather than assumed."""
    from safetensors import safe_open

    student, _ = student_and_reference_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == {without_adapter_name(name) for name in lora_names(student)}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved


def test_adapter_folder_as_reference(tmp_path):
    student, reference = student_and_reference_adapter(tmp_path / "adapter")
    expected = expected_scores(student, reference)
    tensors = load_reference_tensors(tmp_path / "adapter", lora_names(student))
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, dict(reference.named_parameters())[name].detach(), rtol=0, atol=0)
    assert read_reference_metadata(tmp_path / "adapter")["base_model"] == BASE
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # same base checkpoint: no warning
        got = train(student, tmp_path / "run", str(tmp_path / "adapter"))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_adapter_repo_as_reference_fetches_only_its_two_files(hub_server, tmp_path):
    student, reference = student_and_reference_adapter(tmp_path / "adapter")
    expected = expected_scores(student, reference)
    (tmp_path / "adapter" / "training_args.bin").write_bytes(b"\0" * 1024)  # other files of a real adapter repo
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"\0" * 4096)
    api = HfApi()
    repo_id = api.create_repo("tiny-llama-lora-reference").repo_id
    api.upload_folder(folder_path=tmp_path / "adapter", repo_id=repo_id)

    hub_server.requests.clear()
    got = train(student, tmp_path / "run", repo_id)
    fetched = {
        path.rsplit("/", 1)[-1] for method, path in hub_server.requests if method == "GET" and "/resolve/" in path
    }
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_base_checkpoint_check_reads_the_adapter_config(tmp_path):
    student, _ = student_and_reference_adapter(tmp_path / "adapter", base="org/another-model")
    with pytest.warns(UserWarning, match=r"built from checkpoint 'org/another-model'.*starts from 'org/tiny-llama'"):
        train(student, tmp_path / "run", str(tmp_path / "adapter"))


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("lora_alpha", 32, "lora_alpha: reference 32, student 8"),
        ("use_rslora", True, "use_rslora: reference True"),
        ("use_dora", True, "use_dora: reference True, student False"),  # DoRA's change differed from s·BA by 32%
        ("lora_bias", True, "lora_bias: reference True, student False"),
    ],
)
def test_an_adapter_scaled_otherwise_than_the_students_is_refused(tmp_path, setting, value, named):
    """The reference adapter's config says another scaling (alpha / r = 8, or rsLoRA's alpha / √r, where the student
    has 2): PEFT would apply its A and B as another weight change, so it is refused at construction, naming it."""
    student, _ = student_and_reference_adapter(tmp_path / "ref")
    config_path = tmp_path / "ref" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, setting: value}))
    args = MimicConfig(
        output_dir=str(tmp_path / "run"), mimic_layers=["lora"], mimic_reference=str(tmp_path / "ref"), **TRAIN
    )
    with pytest.raises(ValueError, match=rf"scales its adapter otherwise than the student \({named}"):
        MimicTrainer(model=student, args=args, train_dataset=lm_dataset(n=16))


def test_an_adapter_given_in_memory_is_checked_as_a_saved_one(tmp_path):
    """A `PeftModel` given as ``reference=`` with another ``lora_alpha`` was accepted, where the same adapter saved to a
    folder is refused; one with the student's LoraConfig is accepted."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import tiny_llama

    student = lora_student()
    args = MimicConfig(output_dir=str(tmp_path / "run"), mimic_layers=["lora"], **TRAIN)
    scaled = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"scales its adapter otherwise than the student \(lora_alpha: reference 16"):
        MimicTrainer(
            model=student, args=args, train_dataset=lm_dataset(n=16), reference=get_peft_model(tiny_llama(), scaled)
        )
    MimicTrainer(model=student, args=args, train_dataset=lm_dataset(n=16), reference=lora_student(random_b=True))


def test_an_adapter_without_safetensors_weights_is_refused(tmp_path):
    student, _ = student_and_reference_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterReferenceError, match="adapter_config.json but no adapter_model.safetensors"):
        load_reference_tensors(tmp_path / "adapter", lora_names(student))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_build_reference_lora_trains_the_students_adapter_and_saves_a_peft_adapter(hub_server, tmp_path):
    """build_reference(method="lora"): a copy of the student's fresh adapter trained on trusted data, pushed as an
    ordinary PEFT adapter that `PeftModel.from_pretrained` loads from the (loopback) Hub; the student is unchanged,
    and a trainer warns only for a student whose adapter started elsewhere."""
    from hf_gradmimic import build_reference

    student, trusted = lora_student(dropout=0.1), lm_dataset(n=16, seed=3)
    before = {name: student.get_parameter(name).detach().clone() for name in lora_names(student)}
    loss_before = per_sample_mean_loss(student, trusted)
    result = build_reference(
        student,
        trusted,
        method="lora",
        output_dir=tmp_path / "reference",
        eval_dataset=trusted,
        epochs=5,
        learning_rate=1e-2,
        base_model=BASE,
        push_to_hub=True,
        repo_id="tiny-llama-lora-reference",
    )
    for name, tensor in before.items():
        assert torch.equal(student.get_parameter(name), tensor), name
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert result.metadata["method"] == "lora" and float(result.metadata["eval_loss"]) < loss_before
    assert json.loads((tmp_path / "reference" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE

    repo_id = f"{HfApi().whoami()['name']}/tiny-llama-lora-reference"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), repo_id)
    for name, tensor in result.tensors.items():
        torch.testing.assert_close(loaded.get_parameter(name), tensor, rtol=0, atol=0)
        assert not torch.equal(tensor, before[name]) or ".lora_A." in name  # B moved off zero

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(student, tmp_path / "same-init", repo_id)
    other = lora_student(dropout=0.1)
    with torch.no_grad():
        for name in lora_names(other):
            if ".lora_A." in name:
                other.get_parameter(name).mul_(-1.0)
    with pytest.warns(UserWarning, match="another initial adapter"):
        train(other, tmp_path / "other-init", repo_id)


def per_sample_mean_loss(model, dataset) -> float:
    from hf_gradmimic.losses import per_sample_loss

    ids, labels = (torch.as_tensor(np.asarray(dataset[c])) for c in ("input_ids", "labels"))
    with torch.no_grad():
        return float(per_sample_loss(model, model(input_ids=ids), labels).mean())


def test_build_reference_lora_uses_the_lora_recipes_own_defaults(tmp_path):
    """Left unset, build_reference(method="lora")'s epochs, learning rate, weight decay and batch size are the LoRA
    recipe's (3 epochs, 1e-3, 0, 8), not the linear probe's (100 epochs over cached features at 1e-2, batch 256)."""
    from hf_gradmimic import build_reference
    from hf_gradmimic.reference.lora import train_lora_reference

    result = build_reference(lora_student(), lm_dataset(n=12, seed=3), method="lora", output_dir=tmp_path / "built")
    _, expected, _, history = train_lora_reference(
        lora_student(), lm_dataset(n=12, seed=3), output_dir=tmp_path / "own"
    )
    assert len(result.history) == len(history) == 3
    for name, tensor in expected.items():
        torch.testing.assert_close(result.tensors[name], tensor, rtol=0, atol=0)
