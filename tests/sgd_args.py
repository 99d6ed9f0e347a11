"""The `TrainingArguments` the one-step trainer tests share: SGD at a constant rate, no clipping, no weight decay.

With them an optimizer step moves the parameters by exactly the learning rate times the (weighted) mean gradient,
which is what the tests compare with their per-sample oracles; nothing is reported or saved, on the CPU, seed 0.
"""

SGD_ARGS = dict(
    optim="sgd",
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    weight_decay=0.0,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
)
