"""Image–caption curation with MimicTrainer: a CLIP student on a stream of pairs, Grad-Mimic's filter next to CLIP-score filtering.

Runs offline (`hf_gradmimic.testing.captioned_digits`): real digit images with captions written from their labels,
30% of the pool's captions swapped to another digit. A small `CLIPModel` is built from a config; the reference has
the same architecture and initialisation and is trained on a trusted split of clean pairs (in practice: a public
CLIP checkpoint whose architecture you share). The student reads the pool as a `datasets.IterableDataset`, the way
web-scale pairs are read, with the pair ids in `mimic_id_column`; its mimic layers are the last MLP layer of both
towers. After training, Grad-Mimic's Stage-2 filter and the reference's CLIP score each flag mismatched pairs.

    python examples/clip_curation.py --max-steps 120
"""

from __future__ import annotations

import argparse


def train_reference(model, trusted, output_dir: str, epochs: int, seed: int):
    """CLIP's own loss on the trusted pairs, with plain `Trainer` (`return_loss=True` in every batch); saved to
    ``output_dir`` and returned."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    def collate(features):
        inputs = [{key: f[key] for key in ("pixel_values", "input_ids", "attention_mask")} for f in features]
        return {**default_data_collator(inputs), "return_loss": True}

    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=trusted, data_collator=collate).train()
    model.save_pretrained(output_dir)
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=120, help="optimizer steps over the stream of pairs")
    parser.add_argument("--reference-epochs", type=int, default=40)
    parser.add_argument("--mismatch", type=float, default=0.3)
    parser.add_argument("--output-dir", default="example_output/clip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import copy

    import numpy as np
    import torch

    from hf_gradmimic import MimicConfig, MimicTrainer, build_filter, clip_score_filter, clip_scores
    from hf_gradmimic.clip_filter import save_clip_scores
    from hf_gradmimic.testing.captioned_digits import captioned_digits, tiny_clip

    torch.set_num_threads(1)  # a small model: one thread is faster than two that wait on each other
    data = captioned_digits(seed=args.seed, mismatch_fraction=args.mismatch)
    init = tiny_clip(len(data["tokenizer"]), seed=args.seed)
    reference_dir = f"{args.output_dir}/reference"
    reference = train_reference(copy.deepcopy(init), data["trusted"], reference_dir, args.reference_epochs, args.seed)

    pool = data["pool"]
    stream = (
        pool.with_format(None).to_iterable_dataset(num_shards=4).with_format("torch")
    )  # as web-scale pairs are read
    towers = ["vision_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.1.mlp.fc1"]
    mimic_args = MimicConfig(
        output_dir=f"{args.output_dir}/mimic",
        mimic_reference=reference_dir,
        mimic_layers=towers,
        mimic_id_column="uid",
        mimic_temperature=0.5,
        max_steps=args.max_steps,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=20,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
    )
    # CLIPModel is recognised: each pair's term of CLIP's loss, negatives from the whole batch (hf_gradmimic.contrastive).
    trainer = MimicTrainer(model=copy.deepcopy(init), args=mimic_args, train_dataset=stream)
    trainer.train()

    matched = dict(zip(pool[:]["uid"], np.asarray(pool[:]["matched"])))
    mimic_filter = build_filter(mimic_args.output_dir, windows=min(5, args.max_steps))
    results = {
        f"mimic_filter_{k}": v
        for k, v in mimic_filter.evaluate([matched[uid] for uid in mimic_filter.sample_ids]).items()
    }

    scores = clip_scores(reference, pool, id_column="uid")
    save_clip_scores(scores, mimic_args.output_dir)  # next to the score log, for Stage 2
    clip_filter = clip_score_filter(scores, topk=100 * mimic_filter.keep.mean())  # keep as many as Grad-Mimic keeps
    clean = [matched[uid] for uid in clip_filter.table.column("sample_id").to_pylist()]
    results.update({f"clip_score_{k}": v for k, v in clip_filter.evaluate(clean).items()})
    for key, value in results.items():
        print(f"{key}: {value:.3f}")
    return results


if __name__ == "__main__":
    main()
