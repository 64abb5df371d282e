"""The jobs `python -m fvq_jax.main` runs, chosen by `config.task`: resolving a config, running it.

`resolve` turns the config into the task's spec once, before anything is built: every field checked in the one
place that checks it (the spec of its block: README, "Config"), with the device and process counts when they
are known (launch/sweep.py calls it for each run before starting any, without them); `run` is what main.py
calls: it resolves once, hands the spec to the job and returns the process exit status.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from fvq_jax import config_lib

TASKS = ("tokenizer", "eval_tokenizer", "extract_codes", "gpt", "sample", "score", "serve")


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None,
            num_processes: int | None = None) -> Any:
    """The spec of `config`'s task (TokenizerRunSpec, EvalTaskSpec, ExtractionSpec, GPTRunSpec, SampleTaskSpec,
    the score and reference specs, ServeTaskSpec); ConfigError naming the field for a value the task cannot run
    with. Device and process counts: None = unknown, not checked."""
    task = config.get("task")
    config_lib.require_choice(task, "task", TASKS)
    if task == "tokenizer":
        from fvq_jax.train import tokenizer
        return tokenizer.resolve(config, num_devices, num_processes)
    if task == "eval_tokenizer":
        from fvq_jax.evaluation import tokenizer_eval
        return tokenizer_eval.resolve(config)
    if task == "extract_codes":
        from fvq_jax.extraction import job as extraction
        return extraction.resolve(config, num_processes)
    if task == "gpt":
        from fvq_jax.train import gpt
        return gpt.resolve(config, num_devices, num_processes)
    if task == "sample":
        from fvq_jax.sampling import job
        return job.resolve(config, num_devices, num_processes)
    if task == "score":
        from fvq_jax.evaluation import scoring
        return scoring.resolve(config)
    from fvq_jax.serving import server
    return server.resolve(config, num_devices, num_processes)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Run the task; returns the exit status (loop.PREEMPTED_EXIT_CODE when preemption stopped a run)."""
    import jax

    spec = resolve(config, jax.device_count(), jax.process_count())
    if config.task in ("tokenizer", "gpt"):
        from fvq_jax.train import gpt, loop, tokenizer
        trainer = tokenizer if config.task == "tokenizer" else gpt
        results = trainer.train_and_evaluate(spec, workdir)
        return loop.PREEMPTED_EXIT_CODE if "preempted_at_step" in results else 0
    if config.task == "eval_tokenizer":
        from fvq_jax.evaluation import tokenizer_eval
        tokenizer_eval.evaluate_checkpoint(spec, workdir)
    elif config.task == "extract_codes":
        from fvq_jax.extraction import job as extraction
        extraction.extract_codes(spec, workdir)
    elif config.task == "sample":
        from fvq_jax.sampling import job
        job.sample_run(spec, workdir)
    elif config.task == "score":
        from fvq_jax.evaluation import scoring
        scoring.Scorer(*spec)(workdir)
    else:
        from fvq_jax.serving import server
        server.serve(spec, workdir)
    return 0
