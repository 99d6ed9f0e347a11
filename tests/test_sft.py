"""MimicSFTTrainer (trl's SFTTrainer + Grad-Mimic) against per-sample autograd on the sample's supervised tokens."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer import perturbed_reference

from hf_gradmimic import MimicConfig, load_scores

from sgd_args import SGD_ARGS
from tiny_models import lora_names, oracle_scores_from_grads, tiny_llama

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from hf_gradmimic.sft import MimicSFTConfig, MimicSFTTrainer  # noqa: E402

WORDS = ["<pad>", "</s>", "[UNK]", "user", "assistant", ":"] + [f"w{i}" for i in range(34)]
SFT = {**SGD_ARGS, "learning_rate": 0.1, "bf16": False, "gradient_checkpointing": False}
TRAIN = {**SFT, "mimic_alignment_check": False}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
# A chat template whose assistant turns are marked for `return_assistant_tokens_mask` (assistant_only_loss).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'assistant : ' }}"
    "{% generation %}{{ message['content'] + ' ' + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['role'] + ' : ' + message['content'] + ' ' }}{% endif %}{% endfor %}"
)


def word_tokenizer():
    """A word-level tokenizer over `WORDS` (40 ids, as `tiny_llama`'s vocabulary), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def words(rng, low: int, high: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, 34, rng.integers(low, high)))


def pairs(n: int = 16, completion_words: tuple[int, int] = (1, 4), seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{"prompt": words(rng, 2, 6), "completion": " " + words(rng, *completion_words)} for _ in range(n)]


def student(random_b: bool = True):
    model = tiny_llama()
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA, init_lora_weights=not random_b))


def supervised_example(tokenizer, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's own tokenization: prompt + completion + EOS, the prompt's tokens unsupervised."""
    ids = tokenizer(prompt + completion + " " + tokenizer.eos_token)["input_ids"]
    labels = list(ids)
    labels[: len(tokenizer(prompt)["input_ids"])] = [-100] * len(tokenizer(prompt)["input_ids"])
    return torch.tensor(ids), torch.tensor(labels)


def per_sample_grads(model, examples: list[tuple[torch.Tensor, torch.Tensor]], names: list[str]):
    """One autograd pass per sample, alone (no padding): the mean next-token CE over its supervised tokens. The model
    is used in place, not copied: SFTTrainer's fused head binds the forward to the model it patched."""
    params = dict(model.named_parameters())
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for ids, labels in examples:
        logits = model(input_ids=ids[None]).logits[0]
        loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
        for name, grad in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            grads[name].append(grad)
    return {name: torch.stack(value) for name, value in grads.items()}


def recorded_scores(output_dir) -> dict[int, float]:
    table = load_scores(output_dir).to_pandas()
    return {int(row.sample_id): float(row.mimic_score) for row in table[table.global_step == 1].itertuples()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_completion_only_scores_match_per_sample_autograd(tmp_path, checkpointing):
    """Prompt-completion pairs: SFT masks the prompt (completion_only_loss), pads each batch, and drops a pair whose
    prompt alone fills max_length. Every kept pair's score equals ⟨−g_i, v⟩/‖v‖ from its own forward with the
    completion tokens supervised, under its original row index (2 micro-batches of 8); also with TRL's default
    activation checkpointing."""
    import datasets

    tokenizer, model = word_tokenizer(), student()
    rows = pairs(16)
    rows.insert(5, {"prompt": " ".join(["w1"] * 20), "completion": " w2"})  # longer than max_length: dropped by SFT
    names = lora_names(model)
    reference = perturbed_reference(model, names, scale=0.1)
    kept = [i for i in range(len(rows)) if i != 5]
    grads = per_sample_grads(model, [supervised_example(tokenizer, **rows[i]) for i in kept], names)
    expected = dict(zip(kept, oracle_scores_from_grads(grads, model, reference)))

    args = MimicSFTConfig(
        output_dir=str(tmp_path),
        max_length=12,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=1,
        mimic_layers=["lora"],
        **{**TRAIN, "gradient_checkpointing": checkpointing},
    )
    trainer = MimicSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        reference=reference,
    )
    assert len(trainer.train_dataset) == 16
    trainer.train()
    got = recorded_scores(tmp_path)
    assert sorted(got) == kept
    np.testing.assert_allclose([got[i] for i in kept], [expected[i] for i in kept], rtol=1e-4, atol=1e-6)
    logged = trainer.state.log_history[0]
    supervised = sum(len(supervised_example(tokenizer, **rows[i])[0]) for i in kept)
    assert logged["num_tokens"] == supervised and 0 <= logged["mean_token_accuracy"] <= 1 and logged["entropy"] > 0


def test_assistant_only_scores_match_per_sample_autograd(tmp_path):
    """Conversations with ``assistant_only_loss=True``: only the assistant's words (and its EOS) are supervised."""
    import datasets

    tokenizer, model = word_tokenizer(), student()
    rng = np.random.default_rng(1)
    turns = [(words(rng, 2, 5), words(rng, 1, 4)) for _ in range(8)]
    data = datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
            for user, answer in turns
        ]
    )
    examples = [supervised_example(tokenizer, f"user : {user} assistant :", f" {answer}") for user, answer in turns]
    names = lora_names(model)
    reference = perturbed_reference(model, names, scale=0.1)
    expected = oracle_scores_from_grads(per_sample_grads(model, examples, names), model, reference)
    args = MimicSFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, per_device_train_batch_size=8, max_steps=1, **TRAIN
    )
    MimicSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, reference=reference).train()
    got = recorded_scores(tmp_path)
    np.testing.assert_allclose([got[i] for i in range(8)], expected, rtol=1e-4, atol=1e-6)


def test_peft_config_and_an_adapter_reference_on_disk(tmp_path):
    """As users run it: SFTTrainer makes the PEFT model from ``peft_config`` (seeded), the reference is an adapter
    folder trained from the same initial adapter; the scores are those of the student SFT built."""
    import datasets

    tokenizer = word_tokenizer()
    config = peft.LoraConfig(**LORA, init_lora_weights=False)
    rows = pairs(8)
    torch.manual_seed(0)  # what SFTTrainer does (`set_seed(args.seed)`) before it wraps the model
    reference_model = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    with torch.no_grad():
        for name in lora_names(reference_model):
            reference_model.get_parameter(name).add_(0.1)
    reference_model.save_pretrained(tmp_path / "reference")
    args = MimicSFTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        max_steps=1,
        mimic_reference=str(tmp_path / "reference"),
        **TRAIN,
    )
    trainer = MimicSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=config,
    )
    names = lora_names(trainer.model)
    assert set(trainer.mimic_layers.tensors) == set(names)
    reference = {name: reference_model.get_parameter(name).detach() for name in names}
    grads = per_sample_grads(trainer.model, [supervised_example(tokenizer, **row) for row in rows], names)
    expected = oracle_scores_from_grads(grads, trainer.model, reference)
    trainer.train()
    got = recorded_scores(tmp_path / "run")
    np.testing.assert_allclose([got[i] for i in range(8)], expected, rtol=1e-4, atol=1e-6)


STEPS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)


def test_infinite_temperature_trains_like_sft_trainer(tmp_path):
    """τ → ∞ gives every supervised token of the step the same weight (``mimic_token_weighting="token"``), as SFT's
    token mean does: with completions of 1 to 5 words, two steps of MimicSFTTrainer (gradient accumulation included)
    equal SFTTrainer's."""
    import datasets

    data = datasets.Dataset.from_list(pairs(16, completion_words=(1, 6)))
    params = {}
    for name, trainer_class, args in (
        ("plain", trl.SFTTrainer, trl.SFTConfig(output_dir=str(tmp_path / "plain"), **SFT, **STEPS)),
        (
            "mimic",
            MimicSFTTrainer,
            MimicSFTConfig(output_dir=str(tmp_path / "mimic"), mimic_temperature=1e6, **TRAIN, **STEPS),
        ),
    ):
        model = student()
        extra = {"reference": perturbed_reference(model, lora_names(model), scale=0.1)} if name == "mimic" else {}
        trainer_class(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(), **extra).train()
        params[name] = {n: model.get_parameter(n).detach() for n in lora_names(model)}
    for name in params["plain"]:
        torch.testing.assert_close(params["mimic"][name], params["plain"][name], atol=1e-6, rtol=1e-5)


def test_trl_defaults_bf16_and_activation_checkpointing_train_like_sft_trainer(tmp_path):
    """The README's settings, without ``bf16=False``: TRL's defaults (bf16 autocast, activation checkpointing) on CPU
    (``use_cpu=True``). The LoRA update then comes from the recorded layer uses, whose inputs and δ are bf16 while the
    adapter's weights are float32; at τ → ∞ it must equal SFTTrainer's autograd update under the same autocast."""
    import datasets

    defaults = {key: value for key, value in SFT.items() if key not in ("bf16", "gradient_checkpointing")}
    data = datasets.Dataset.from_list(pairs(16, completion_words=(3, 4)))
    params, initial = {}, None
    for name, trainer_class, args in (
        ("plain", trl.SFTTrainer, trl.SFTConfig(output_dir=str(tmp_path / "plain"), **defaults, **STEPS)),
        (
            "mimic",
            MimicSFTTrainer,
            MimicSFTConfig(
                output_dir=str(tmp_path / "mimic"),
                mimic_temperature=1e6,
                mimic_alignment_check=False,
                **defaults,
                **STEPS,
            ),
        ),
    ):
        assert args.bf16 and args.gradient_checkpointing
        model = student()
        initial = {n: model.get_parameter(n).detach().clone() for n in lora_names(model)}
        extra = {"reference": perturbed_reference(model, lora_names(model), scale=0.1)} if name == "mimic" else {}
        trainer_class(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(), **extra).train()
        params[name] = {n: model.get_parameter(n).detach() for n in lora_names(model)}
    for name in params["plain"]:
        plain_update = params["plain"][name] - initial[name]
        assert plain_update.abs().max() > 0
        # bf16 matmuls: the two updates agree to bf16's precision, not float32's
        torch.testing.assert_close(
            params["mimic"][name] - initial[name], plain_update, atol=2e-2 * float(plain_update.abs().max()), rtol=0
        )


def test_mimic_sft_config_defaults_build_on_cpu_without_warnings():
    """`SFTConfig()` on a CPU-only machine refuses TRL's bf16 default and warns that `gradient_checkpointing` is
    deprecated; `MimicSFTConfig()` builds silently, in float32 there, with activation checkpointing on."""
    import warnings

    from transformers.utils import is_torch_bf16_gpu_available

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = MimicSFTConfig(output_dir="x")
    assert args.activation_checkpointing and args.gradient_checkpointing
    assert args.bf16 == is_torch_bf16_gpu_available()
    assert MimicSFTConfig(output_dir="x", use_cpu=True).bf16  # as SFTConfig(use_cpu=True)
    assert not MimicSFTConfig(output_dir="x", use_cpu=True, gradient_checkpointing=False).activation_checkpointing


def reference_adapter(rows, output_dir, **kwargs) -> dict[str, torch.Tensor]:
    from hf_gradmimic import build_reference

    model = student()
    before = {name: model.get_parameter(name).detach().clone() for name in lora_names(model)}
    result = build_reference(
        model, rows, method="lora", output_dir=output_dir, epochs=2, batch_size=4, learning_rate=1e-2, **kwargs
    )
    assert all(torch.equal(model.get_parameter(name), tensor) for name, tensor in before.items())  # left unchanged
    return result.tensors


def test_build_reference_lora_takes_the_rows_sft_trainer_takes(tmp_path):
    """build_reference(method="lora") on prompt-completion pairs and on conversations (assistant-only loss, given by
    the run's MimicSFTConfig) trains the same adapter as on the same rows tokenized and masked by hand (prompt + completion
    + EOS, the prompt unsupervised); rows SFTTrainer cannot use are refused by name."""
    rows = pairs(8)
    examples = [supervised_example(word_tokenizer(), **row) for row in rows]
    tokenized = [{"input_ids": ids.tolist(), "labels": labels.tolist()} for ids, labels in examples]
    expected = reference_adapter(tokenized, tmp_path / "by-hand")
    got = reference_adapter(rows, tmp_path / "pairs", processing_class=word_tokenizer(), eval_dataset=rows[:4])
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(1)
    turns = [(words(rng, 2, 5), words(rng, 1, 4)) for _ in range(8)]
    conversations = [
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        for user, answer in turns
    ]
    examples = [
        supervised_example(word_tokenizer(), f"user : {user} assistant :", f" {answer}") for user, answer in turns
    ]
    expected = reference_adapter(
        [{"input_ids": ids.tolist(), "labels": labels.tolist()} for ids, labels in examples], tmp_path / "chat-by-hand"
    )
    got = reference_adapter(
        conversations,
        tmp_path / "chat",
        processing_class=word_tokenizer(),
        sft_config=MimicSFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **TRAIN),
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"takes the rows SFTTrainer takes.*got columns \['answer', 'question'\]"):
        reference_adapter([{"question": "w1 w2", "answer": "w3"}], tmp_path / "bad", processing_class=word_tokenizer())
    with pytest.raises(ValueError, match="pass `processing_class=tokenizer`"):
        reference_adapter(rows, tmp_path / "no-tokenizer")


def test_settings_that_break_one_sample_per_row_are_refused(tmp_path):
    import datasets

    data = datasets.Dataset.from_list(pairs(4))
    common = dict(output_dir=str(tmp_path), **TRAIN)
    for setting in ({"packing": True}, {"padding_free": True}):
        with pytest.raises(ValueError, match=f"does not support `{next(iter(setting))}=True`"):
            MimicSFTTrainer(
                model=student(),
                args=MimicSFTConfig(**common, **setting),
                train_dataset=data,
                processing_class=word_tokenizer(),
            )
    with pytest.raises(TypeError, match="needs `args` to be a MimicSFTConfig"):
        MimicSFTTrainer(
            model=student(),
            args=MimicConfig(output_dir=str(tmp_path)),
            train_dataset=data,
            processing_class=word_tokenizer(),
        )
    with pytest.raises(ValueError, match="per_sample_loss_fn"):
        MimicSFTTrainer(
            model=student(),
            args=MimicSFTConfig(**common),
            train_dataset=data,
            processing_class=word_tokenizer(),
            compute_loss_func=lambda *a, **k: 0,
        )


def test_mimic_sft_config_shares_every_mimic_field_with_mimic_config():
    mimic = {f.name: f for f in MimicConfig.__dataclass_fields__.values() if f.name.startswith("mimic_")}
    sft = {f.name: f for f in MimicSFTConfig.__dataclass_fields__.values() if f.name.startswith("mimic_")}
    assert mimic.keys() == sft.keys()
    assert all(sft[name].metadata == mimic[name].metadata for name in mimic)
    assert MimicSFTConfig(output_dir="x", use_cpu=True).mimic_layers == ["lora"]
    with pytest.raises(ValueError, match="mimic_temperature"):
        MimicSFTConfig(output_dir="x", use_cpu=True, mimic_temperature=0)


def test_hf_gradmimic_imports_without_trl_and_peft():
    """trl and peft are optional (`hf-gradmimic[trl]`): without them the package and MimicTrainer import, and the SFT
    names say what to install."""
    code = (
        "import sys\n"
        "sys.modules['trl'] = None\nsys.modules['peft'] = None\n"  # `import trl` now fails as when not installed
        "import hf_gradmimic\n"
        "from hf_gradmimic import MimicConfig, MimicTrainer\n"
        "from hf_gradmimic.training.mimic_layers import MimicLayers\n"
        "try:\n    hf_gradmimic.MimicSFTTrainer\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'hf-gradmimic[trl]'" in result.stdout


def per_sample_cross_entropy(outputs, inputs) -> torch.Tensor:
    """A user's per-sample loss: each sample's mean next-token cross entropy over its supervised tokens."""
    logits, labels = outputs.logits[:, :-1], inputs["labels"][:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return tokens.sum(1) / (labels != -100).sum(1).clamp_min(1)


def test_a_user_loss_function_gets_the_logits_and_the_lm_head_is_refused_under_the_fused_head(tmp_path):
    """The fused LM head's outputs have no logits: a ``per_sample_loss_fn`` reading them failed at the first step, and
    it now gets the model's whole logits (its first logged loss is its mean over the first batch, by hand). Under
    the fused head (SFT's own loss), the head as mimic layer never ran and failed at the first step: refused at
    construction, naming it."""
    import datasets

    data = datasets.Dataset.from_list(pairs(8))
    args = MimicSFTConfig(
        output_dir=str(tmp_path / "a"), mimic_temperature=1e6, per_device_train_batch_size=8, max_steps=1, **TRAIN
    )
    model = student()
    reference = perturbed_reference(model, lora_names(model), scale=0.1)
    before = copy.deepcopy(model)
    trainer = MimicSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=word_tokenizer(),
        reference=reference,
        per_sample_loss_fn=per_sample_cross_entropy,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    with torch.no_grad():
        outputs = before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = per_sample_cross_entropy(outputs, batch).mean().item()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    np.testing.assert_allclose(logged, [expected], rtol=1e-4)

    full = tiny_llama()
    head = {"lm_head.weight": full.lm_head.weight.detach() + 0.1}
    head_args = MimicSFTConfig(output_dir=str(tmp_path / "b"), mimic_layers=["lm_head"], **TRAIN)
    with pytest.raises(ValueError, match=r"Mimic layer\(s\) \['lm_head'\] are the LM head, which TRL's fused LM head"):
        MimicSFTTrainer(
            model=full, args=head_args, train_dataset=data, processing_class=word_tokenizer(), reference=head
        )
