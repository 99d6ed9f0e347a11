"""Image classification with MimicTrainer: a ViT built from a config, classifier head as mimic layer.

Images are scikit-learn's bundled digits (8×8, upsampled to 32×32, 3 channels), so it runs offline;
40% of the training labels are flipped. The ViT is randomly initialised from `ViTConfig` (nothing is
downloaded); the reference is a head linear-probed on its frozen features with clean labels, so it
shares the student's coordinates.

    python examples/image_classification.py --epochs 5
"""

from __future__ import annotations

import argparse

import numpy as np


def digit_images(noise_rate: float, seed: int, size: int = 32):
    import torch
    import torch.nn.functional as F

    from hf_gradmimic.testing.digits import load_noisy_digits

    data = load_noisy_digits(noise_rate=noise_rate, seed=seed)

    def to_images(batch):
        pixels = torch.as_tensor(np.asarray(batch["pixel_values"])).view(-1, 1, 8, 8)
        images = F.interpolate(pixels, size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
        return {"pixel_values": (images - 0.5) / 0.5}

    return data.map(to_images, batched=True).with_format("torch")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--max-train-samples", type=int, default=None, help="Use only the first N training rows.")
    parser.add_argument("--output-dir", default="example_output/image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from hf_gradmimic import MimicConfig, MimicTrainer, build_reference
    from hf_gradmimic.metrics import accuracy_compute_metrics

    data = digit_images(args.noise_rate, args.seed)
    train, test = data["train"], data["test"]
    if args.max_train_samples:
        train, test = (
            train.select(range(args.max_train_samples)),
            test.select(range(min(len(test), args.max_train_samples))),
        )
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * args.hidden_size,
        num_labels=10,
    )

    def fresh_model():
        torch.manual_seed(args.seed)  # every copy starts from the same "pretrained" weights
        return ViTForImageClassification(config)

    clean = train.remove_columns(["label", "is_clean"]).rename_column("clean_label", "label")
    reference_dir = f"{args.output_dir}/reference"
    build_reference(fresh_model(), clean, layers=["classifier"], output_dir=reference_dir, eval_dataset=test, epochs=40)

    mimic_args = MimicConfig(
        output_dir=f"{args.output_dir}/mimic",
        mimic_reference=reference_dir,
        mimic_layers=["classifier"],
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        eval_strategy="epoch",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
    )
    noisy = train.remove_columns(["clean_label", "is_clean"])
    trainer = MimicTrainer(
        model=fresh_model(),
        args=mimic_args,
        train_dataset=noisy,
        eval_dataset=test,
        compute_metrics=accuracy_compute_metrics,
    )
    trainer.train()
    results = {"eval_accuracy": trainer.evaluate()["eval_accuracy"]}
    print(results)
    return results


if __name__ == "__main__":
    main()
