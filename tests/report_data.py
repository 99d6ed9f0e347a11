"""A small scored run on disk for the report tests: a score log with provenance, and the image-text dataset it scored.

Every fourth sample is "noisy": its records carry a low softmax weight, so the filter's lowest keep
probabilities are among them. Each sample's image is one solid colour that encodes its row index, and
its text holds HTML that must show as text on the report page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_SAMPLES = 96
BATCH = 32
EPOCHS = 3
# Text that would be markup if the page did not escape it.
HOSTILE_TEXT = '<script>document.title="pwned"</script> <b>bold</b> & "quoted" {{ not_jinja }}'
PROVENANCE = {
    "scorer": {
        "name": "mimic",
        "mode": "reweight",
        "reference": {"source": "org/</pre><script>x()</script>", "revision": None, "tensors_sha256": "ab" * 32},
    },
    "sample_ids": {"column": None, "train_rows": N_SAMPLES},
    "temperature": 0.5,
}


def sample_colour(index: int) -> tuple[int, int, int]:
    """A colour unique to each row index (the oracle for the thumbnails)."""
    return (index * 2 % 256, 255 - index * 2 % 256, (index * 37) % 256)


def write_scored_run(output_dir: Path, seed: int = 0) -> Path:
    """Write the score log (3 epochs of 3 steps of 32) and its provenance under ``output_dir``."""
    from hf_gradmimic.score_log_io import ScoreWriter, write_provenance

    rng = np.random.default_rng(seed)
    noisy = np.arange(N_SAMPLES) % 4 == 0
    writer = ScoreWriter(output_dir)
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(N_SAMPLES)
        for start in range(0, N_SAMPLES, BATCH):
            step += 1
            ids = order[start : start + BATCH]
            raw = np.where(noisy[ids], rng.normal(-2.0, 0.5, ids.size), rng.normal(1.0, 0.5, ids.size))
            weights = np.exp(raw) / np.exp(raw).sum()
            writer.add_step(
                global_step=step,
                epoch=epoch + (start + BATCH) / N_SAMPLES,
                sample_ids=ids,
                mimic_scores=raw,
                weights=weights,
                losses=np.where(noisy[ids], 2.0, 0.2) + rng.random(ids.size) * 0.1,
                batch_size=BATCH,
            )
    writer.close()
    from hf_gradmimic.tables import dataset_signature

    # As the trainer records it: the ids are row indices of this dataset, which its signature pins.
    sample_ids = {**PROVENANCE["sample_ids"], "train_content": dataset_signature(image_text_dataset())}
    write_provenance(output_dir, {**PROVENANCE, "sample_ids": sample_ids})
    return output_dir


def image_text_dataset():
    """The scored samples as a `datasets.Dataset` with an Image column, a text column and a label."""
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (16, 12), sample_colour(index)) for index in range(N_SAMPLES)]
    texts = [f"sample {index}: {HOSTILE_TEXT}" for index in range(N_SAMPLES)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "text": texts, "label": [index % 3 for index in range(N_SAMPLES)]}, features=features
    )
