"""Fault injection: kill a tiny training run with SIGKILL again and again, resume it each time, and check
that it ends exactly where an uninterrupted run ends, with no checkpoint lost.

  python -m fvq_jax.tools.fault_injection --out=/tmp/fvq_faults [--kills=10] [--steps=40] [--seed=0]

Runs `python -m fvq_jax.main --config=configs/tokenizer.py:tiny` (16x16 photos, seconds per step) once
without interruption, then once more, killed `--kills` times: about half of the kills land while a
checkpoint is being written (an Orbax temporary directory exists), the others at a random moment
(startup, compilation, a step, the final evaluation). After every kill it records which checkpoints
exist; a finalised checkpoint that later disappears is a lost checkpoint (the keep-N policy is set
above the number of saves, so none is ever deleted on purpose). At the end it compares every logged
loss and every parameter, bit for bit, and writes report.json. Kept out of the test suite (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSSES = ("loss", "pixel_loss", "perceptual_loss", "quantizer_loss", "disc_loss", "usage", "grad_norm", "lr")


def command(workdir: str, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "fvq_jax.main", "--config=configs/tokenizer.py:tiny", f"--workdir={workdir}",
            f"--config.train.num_steps={steps}", f"--config.train.checkpoint_every={every}",
            "--config.train.keep_checkpoints=1000"]


def finalised_steps(workdir: str) -> set[int]:
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return {int(n) for n in names if n.isdigit() and os.path.exists(os.path.join(directory, n, "commit_success.txt"))}


def temporary_dirs(workdir: str) -> set[str]:
    """Orbax's temporary checkpoint directories in workdir (a killed write leaves its own behind)."""
    directory = os.path.join(workdir, "checkpoints")
    return {n for n in os.listdir(directory) if "tmp" in n} if os.path.isdir(directory) else set()


def logged(workdir: str) -> dict[int, tuple]:
    path = os.path.join(workdir, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"metrics.jsonl logs some steps twice: {sorted(steps)}")
    return {r["step"]: tuple(r[k] for k in LOSSES) for r in records}


def final_params(workdir: str) -> list[np.ndarray]:
    import jax

    from fvq_jax.train.restore import restore_tokenizer

    state = restore_tokenizer(workdir).state
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.disc_params, state.opt_state))]


def run_to_end(workdir: str, steps: int, every: int, env) -> float:
    start = time.time()
    subprocess.run(command(workdir, steps, every), cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.fault_injection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new directory for the two runs and report.json")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint_every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists")
    rng = random.Random(args.seed)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.out, "jit_cache"))
    reference, faulty = os.path.join(args.out, "uninterrupted"), os.path.join(args.out, "killed")

    seconds = run_to_end(reference, args.steps, args.checkpoint_every, env)
    print(f"uninterrupted run: {args.steps} steps in {seconds:.0f} s", flush=True)
    kills, seen = [], set()
    while len(kills) < args.kills:
        in_write = len(kills) % 2 == 0
        process = subprocess.Popen(command(faulty, args.steps, args.checkpoint_every), cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A resumed run is shorter than the first (fewer steps left, compiled programs cached): kill
        # early enough that it is still running, from start-up to a few steps in.
        started, deadline = time.time(), time.time() + rng.uniform(0.02, 0.3) * seconds
        leftovers = temporary_dirs(faulty)  # a write counts only if this process started it
        writing = lambda: bool(temporary_dirs(faulty) - leftovers)  # noqa: E731
        while process.poll() is None and not (writing() if in_write else time.time() > deadline):
            time.sleep(0.002)
        if process.poll() is not None:
            print(f"the run finished before kill {len(kills) + 1}: use more --steps for more kills", flush=True)
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = finalised_steps(faulty)
        lost = sorted(seen - now)
        if lost:
            raise AssertionError(f"kill {len(kills) + 1} lost finalised checkpoints {lost}")
        seen |= now
        kills.append(dict(after_s=round(time.time() - started, 2), during_checkpoint_write=in_write and writing(),
                          latest_step=max(now, default=None), logged_up_to=max(logged(faulty), default=None)))
        print(f"kill {len(kills)}: {kills[-1]}", flush=True)
    run_to_end(faulty, args.steps, args.checkpoint_every, env)
    lost = sorted(seen - finalised_steps(faulty))
    reference_losses, faulty_losses = logged(reference), logged(faulty)
    same_losses = reference_losses == faulty_losses
    same_params = all(np.array_equal(a, b) for a, b in zip(final_params(reference), final_params(faulty)))
    report = dict(steps=args.steps, checkpoint_every=args.checkpoint_every, kills=kills,
                  kills_during_checkpoint_write=sum(k["during_checkpoint_write"] for k in kills),
                  lost_checkpoints=lost, losses_identical=same_losses, params_identical=same_params,
                  logged_steps=sorted(faulty_losses) == list(range(1, args.steps + 1)))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}), flush=True)
    ok = same_losses and same_params and not lost and report["logged_steps"] and len(kills) == args.kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
