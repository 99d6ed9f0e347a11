"""Causal language modelling with MimicTrainer: a GPT-2 built from a config, `lm_head` as mimic layer.

The corpus is synthetic: "clean" sequences follow a simple rule (counting up modulo the vocabulary),
"noisy" ones are random tokens. The reference is the same checkpoint trained briefly on clean
sequences only (same starting weights, so it shares the student's coordinates); only its `lm_head`
tensor is read. `tie_word_embeddings=False` keeps `lm_head` a separate `nn.Linear`: with tied
weights the score would cover only the head's use of the shared matrix, not its embedding use.

    python examples/causal_lm.py --max-steps 30
"""

from __future__ import annotations

import argparse

import numpy as np


def counting_corpus(num_samples: int, length: int, vocab: int, noise_rate: float, seed: int):
    import datasets

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, vocab, size=num_samples)
    steps = rng.integers(1, 4, size=num_samples)
    ids = (starts[:, None] + steps[:, None] * np.arange(length)[None, :]) % vocab
    noisy = rng.random(num_samples) < noise_rate
    ids[noisy] = rng.integers(0, vocab, size=(int(noisy.sum()), length))
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids.copy(), "is_clean": ~noisy}).with_format("torch")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--output-dir", default="example_output/causal_lm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hf_gradmimic import MimicConfig, MimicTrainer, load_scores

    vocab, length = 64, 24
    corpus = counting_corpus(args.num_samples, length, vocab, args.noise_rate, args.seed)
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False)

    def fresh_model():
        torch.manual_seed(args.seed)
        return GPT2LMHeadModel(config)

    common = dict(
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        logging_steps=10,
    )
    reference = fresh_model()
    clean = corpus.filter(lambda row: row["is_clean"]).remove_columns(["is_clean"])
    Trainer(
        model=reference,
        args=TrainingArguments(output_dir=f"{args.output_dir}/reference", max_steps=args.reference_steps, **common),
        train_dataset=clean,
    ).train()
    reference.save_pretrained(f"{args.output_dir}/reference")

    mimic_args = MimicConfig(
        output_dir=f"{args.output_dir}/mimic",
        mimic_reference=f"{args.output_dir}/reference",
        mimic_layers=["lm_head"],
        max_steps=args.max_steps,
        **common,
    )
    trainer = MimicTrainer(model=fresh_model(), args=mimic_args, train_dataset=corpus.remove_columns(["is_clean"]))
    trainer.train()
    scores = load_scores(mimic_args.output_dir).to_pandas()
    is_clean = np.asarray(corpus["is_clean"])[scores.sample_id.values]
    results = {
        "mean_weight_clean": float(scores.weight[is_clean].mean()),
        "mean_weight_noisy": float(scores.weight[~is_clean].mean()),
    }
    print(results)
    return results


if __name__ == "__main__":
    main()
