"""Entry point: `python -m fvq_jax.main --config=configs/tokenizer.py --workdir=DIR`.

The config's `task` field picks the job (tokenizer | eval_tokenizer | extract_codes | gpt | sample | score | serve).
A training run stopped by SIGTERM (preemption) saves a checkpoint and exits with status 75 (EX_TEMPFAIL: start
it again to resume); a finished run exits 0. Multi-host runs call
`jax.distributed.initialize` before anything touches the backend: with --coordinator_address
(plus --num_processes / --process_id) for explicit clusters, or --multihost for the
auto-detected ones (Cloud TPU pods, SLURM, ...).
"""

from __future__ import annotations

import os
import sys

# Before anything imports TensorFlow (only TFDS and TensorBoard use it; it computes nothing here):
# no INFO chatter, and no oneDNN banner.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fvq_jax import tasks  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, summaries and reports go here.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")

def initialize_distributed() -> None:
    """Connect the processes of a multi-host run; a no-op for a single process."""
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tokenizer.py")
    initialize_distributed()
    import jax

    # tf.data / TFDS must never grab the accelerator.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    if not flags.FLAGS["verbosity"].present:
        # The console gets the progress lines and warnings; every scalar still goes to TensorBoard
        # and metrics.jsonl. -v 0 brings back the INFO logs (Orbax, clu, the data pipeline).
        logging.set_verbosity(logging.WARNING)

    logging.info("JAX %s, process %d/%d, %d devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    status = tasks.run(config, _WORKDIR.value)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    app.run(main)
