"""Codebook usage of a VQBridge run by in-patch position, from its training-time usage window.

  python -m fvq_jax.tools.bridge_positions --workdir=RUN_DIR [--step N]

VQBridge lays the K codes out as a sqrt(K) x sqrt(K) grid, cuts it into p x p patches, and its
last Linear maps each patch's transformer token to the p^2 codes of that patch: the codes at one
in-patch position (row % p, col % p) all come from the same row-group of that Linear's weights,
and only that row-group's own selected codes give it gradient. A position can therefore fall out
of use as a whole, which caps usage at (live positions) / p^2. This prints, for the checkpoint's
usage window (the most recent training assignments), the fraction of each position's codes in
use as a p x p grid, the live positions, and the usage within them; and, from the run's
metrics.jsonl (the trainer logs each position's share of the window), the first logged step at
which each position was selected.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from fvq_jax.evaluation.codebook_health import bridge_position_usage
from fvq_jax.evaluation.host import to_host
from fvq_jax.models.load import load_tokenizer
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS


def position_report(workdir, *, step: int | None = None) -> dict:
    """The usage window of the run in `workdir` (latest step unless `step`), by in-patch position."""
    loaded = load_tokenizer(workdir, step=step)
    projector = loaded.config.quantizer.projector
    if projector not in BRIDGE_PRESETS:
        raise ValueError(f"the run in {workdir} uses projector {projector!r}, not a VQBridge preset: "
                         "it has no in-patch positions")
    patch = BRIDGE_PRESETS[projector].patch
    num_codes = loaded.model.quantizer.num_codes
    window = to_host(loaded.model.quantizer.usage_buffer[...])
    window = window[window >= 0]  # -1: slots not yet written
    counts = np.bincount(window, minlength=num_codes)
    per_position = bridge_position_usage(counts, patch)
    live = per_position > 0
    return {"step": loaded.step, "projector": projector, "patch": patch, "window": int(window.size),
            "usage": float(np.mean(counts > 0)), "per_position": per_position,
            "live_positions": int(live.sum()),
            "usage_within_live": float(per_position[live].mean()) if live.any() else 0.0,
            "first_live": _first_live(workdir, patch, loaded.step)}


def first_live_steps(records: list[dict], patch: int) -> np.ndarray:
    """[p, p] the first logged step at which each in-patch position had a share of the usage window
    (`bridge_position_share/r{row}c{col}` > 0), -1 for never; records: metrics.jsonl lines."""
    first = np.full((patch, patch), -1, np.int64)
    for record in sorted(records, key=lambda r: r["step"]):
        for r in range(patch):
            for c in range(patch):
                if first[r, c] < 0 and record.get(f"bridge_position_share/r{r}c{c}", 0) > 0:
                    first[r, c] = record["step"]
    return first


def _first_live(workdir, patch: int, step: int) -> np.ndarray | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if r["step"] <= step]
    return first_live_steps(records, patch) if any("bridge_live_positions" in r for r in records) else None


def format_report(report: dict) -> str:
    p = report["patch"]
    lines = [f"step {report['step']}, VQBridge {report['projector']}: {report['window']:,} assignments in the "
             f"usage window, {report['usage']:.1%} of the codebook in use",
             f"fraction of the codes at each in-patch position (row % {p}, col % {p}) in use:"]
    lines += ["  " + " ".join(f"{value:6.1%}" for value in row) for row in report["per_position"]]
    lines.append(f"live positions: {report['live_positions']}/{p * p}; usage within them: "
                 f"{report['usage_within_live']:.1%}")
    if report.get("first_live") is not None:
        lines.append("first logged step at which each position was selected (-1: never):")
        lines += ["  " + " ".join(f"{value:6d}" for value in row) for row in report["first_live"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.bridge_positions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        report = position_report(args.workdir, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(format_report(report))


if __name__ == "__main__":
    main()
