"""The jobs `python -m fvq_jax.main` runs, chosen by `config.task`: checking a config, running it.

`check_config` runs every check that needs no model, data or devices (launch/sweep.py calls it for
each run before starting any); `run` is what main.py calls and returns the process exit status.
"""

from __future__ import annotations

import ml_collections

from fvq_jax import config_lib

TASKS = ("tokenizer", "eval_tokenizer", "extract_codes", "gpt", "sample", "score")


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
    """ConfigError naming the field for a value the task cannot run with (device counts: None = unknown)."""
    task = config.get("task")
    config_lib.require_choice(task, "task", TASKS)
    if task == "tokenizer":
        from fvq_jax.train import tokenizer
        tokenizer.check_config(config, num_devices, num_processes)
    elif task == "extract_codes":
        from fvq_jax.extraction import job as extraction
        extraction.check_config(config, num_processes)
    elif task == "gpt":
        from fvq_jax.train import gpt
        gpt.check_config(config, num_devices, num_processes)
    elif task == "sample":
        from fvq_jax.sampling import job
        job.check_config(config)
    elif task == "score":
        from fvq_jax.evaluation import scoring
        scoring.check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Run the task; returns the exit status (loop.PREEMPTED_EXIT_CODE when preemption stopped a run)."""
    check_config(config)
    if config.task in ("tokenizer", "gpt"):
        from fvq_jax.train import gpt, loop, tokenizer
        trainer = tokenizer if config.task == "tokenizer" else gpt
        results = trainer.train_and_evaluate(config, workdir)
        return loop.PREEMPTED_EXIT_CODE if "preempted_at_step" in results else 0
    if config.task == "extract_codes":
        from fvq_jax.extraction import job as extraction
        extraction.extract_codes(config, workdir)
    elif config.task == "sample":
        from fvq_jax.sampling import job
        job.sample_run(config, workdir)
    elif config.task == "score":
        from fvq_jax.evaluation import scoring
        scoring.score_samples(config, workdir)
    else:
        from fvq_jax.evaluation import tokenizer_eval
        tokenizer_eval.evaluate_checkpoint(config, workdir)
    return 0
