"""The owners of `MimicTrainer`'s jobs, one module each; `hf_gradmimic.trainer` holds only the flow between them.

- `batch`: sample ids through batching, and our columns taken off each batch;
- `checks`: the set-ups refused, and resuming from complete checkpoints only;
- `mimic_layers`: the mimic layers, their tensors and every module using them;
- `capture`: forward hooks and the backward started at the logits;
- `coupled`: scores under a batch-coupled (contrastive) loss, by directional derivatives;
- `step_softmax`: the online softmax over an optimizer step, across micro-batches and processes;
- `score_log`: the score-log callback and the repeated-row flags (by row, or by key for a stream);
- `log_lock`: one writer per score log (a lock file naming the run's pid and host);
- `resume_guard`: what a checkpoint's score log means, and the resumes that would change it, refused;
- `streaming`: a stream's sample ids through batching, workers and processes, and where it resumes;
- `diagnostics`: the base-checkpoint check, the alignment check and the running monitor;
- `audit`: the running filter audit against known clean flags;
- `metrics_buffer`: metrics gathered per step, averaged into the logs.
"""
