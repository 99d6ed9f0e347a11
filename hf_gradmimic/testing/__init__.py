"""Test doubles for hf-gradmimic's own tests, demo and examples, as `transformers.testing_utils` ships its own.

- `hf_gradmimic.testing.hub_server`: a loopback server of the Hugging Face Hub HTTP API that the
  real ``huggingface_hub`` / ``datasets`` / ``transformers`` clients talk to (``gradmimic hub``,
  ``python -m hf_gradmimic.testing.hub_server``);
- `hf_gradmimic.testing.digits`: scikit-learn's bundled digits with symmetric label noise and a
  small `PreTrainedModel` over a frozen random backbone, real data that works offline;
- `hf_gradmimic.testing.captioned_digits`: the same digits as image–caption pairs (captions templated from
  the labels, some swapped), a word-level caption tokenizer and a small `CLIPModel` from a config.

Nothing here is imported by the library itself, and importing this package imports neither
(``digits`` needs torch and transformers).
"""
