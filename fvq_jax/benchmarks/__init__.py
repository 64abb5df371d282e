"""Speed and memory benchmarks; each compares against a baseline in the same run (RESULTS.md)."""

import os

# As in fvq_jax.main: TensorFlow (imported by TFDS / the metric writers, computing nothing here)
# stays quiet in benchmark output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
