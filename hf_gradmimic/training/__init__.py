"""The owners of `MimicTrainer`'s jobs, one module each; `hf_gradmimic.trainer` holds only their set-up and the Trainer overrides.

- `step`: one micro-batch forwarded, scored and turned into the loss to backpropagate (reweight, select, non-finite
  rows), and the step's backward plan;
- `dataset`: the training set as the trainer sees it (sample ids and clean flags read, a row index or stream ids added);
- `batch`: sample ids through batching, and our columns taken off each batch;
- `stream_ids`: a stream's sample ids through batching, workers and processes, and where it resumes;
- `checks`: the set-ups refused, and resuming from complete checkpoints only;
- `mimic_layers`: the mimic layers, their tensors and every module using them;
- `capture`: forward hooks and the backward started at the logits;
- `use_backward`: the weighted gradient through the recorded uses of the mimic tensors only;
- `coupled`: scores under a batch-coupled (contrastive) loss, by directional derivatives;
- `guards`: samples with a non-finite loss or score, or no supervised label, weighted 0;
- `token_weighting`: how a sample's weight spreads over its supervised tokens;
- `step_softmax`: the online softmax over an optimizer step, across micro-batches and processes;
- `selection`: select mode, the candidate batch being the whole optimizer step;
- `scorer_state`: a scorer's state in a checkpoint folder (safetensors + JSON);
- `score_log`: the score-log callback and the repeated-row flags (by row, or by key for a stream);
- `log_lock`: one writer per score log (a lock file naming the run's pid and host);
- `resume_guard`: what a checkpoint's score log means, and the resumes that would change it, refused;
- `reference_verdict`: the reference's per-sample loss and margin, on the student's current features or as the
  reference model's own;
- `starting_weights`: the weights training found, kept for the reference model's own verdict;
- `diagnostics`: the base-checkpoint check, the alignment check and the running monitor;
- `audit`: the running filter audit against known clean flags;
- `metrics_buffer`: metrics gathered per step, averaged into the logs;
- `internal_callbacks`: the trainer's own callbacks, kept out of the user's callback list.
"""
