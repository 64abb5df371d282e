r"""Run a sweep of `python -m fvq_jax.main` jobs on this machine (XManager-style, no XManager).

A sweep is a Python file, by convention configs/sweeps/NAME.py, that defines

  get_sweep() -> list[dict]
      One dict per run. The keys are flags of fvq_jax.main, without the dashes:
        "config":  the config file and its argument, e.g. "configs/tokenizer.py:local,codebook=4096"
                   (required);
        "config.<field>": an override of one config field, e.g. "config.quantizer.projector": "none"
                   (any number; values are Python str / int / float / bool / tuple).
      --workdir is set per run: WORKDIR_ROOT/<run name>.
  name(params) -> str   (optional)
      The run name for one of those dicts. Without it, the name joins the config argument and the
      overrides' last field names: "local_codebook=4096_projector=none".

Every run is checked before anything starts: known keys, unique names, and each override must name
an existing field of its config with a value of the field's type.

  python launch/sweep.py --sweep=configs/sweeps/example.py --workdir_root=/tmp/fvq_example --dry-run
  python launch/sweep.py --sweep=configs/sweeps/example.py --workdir_root=/tmp/fvq_example \
      [--parallel=2] [--only='k1024_'] [--gpus_per_run=4] [-- --config.data.num_workers=2]

Runs go N at a time (--parallel), each logging to WORKDIR_ROOT/<run>/stdout.log. A run is finished
when its workdir holds the final evaluation (eval/final/metrics.json) and metrics.jsonl reached the
run's train.num_steps; finished runs are skipped, others (new, failed, preempted) are started, and
the trainer resumes them from their newest checkpoint. WORKDIR_ROOT/sweep.json describes every run
(parameters, command, status) and is rewritten as runs end. Ctrl-C or SIGTERM passes SIGTERM on to
the running jobs, so each saves a checkpoint before exiting. Flags after `--` go to every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

FINAL_EVAL = os.path.join("eval", "final", "metrics.json")
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._=+-]*"
_FIELD_PATTERN = r"config(\.[A-Za-z_][A-Za-z0-9_]*)+"
_SCALARS = (str, int, float, bool)


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file and the run."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One job of a sweep: its flags for fvq_jax.main, except --workdir."""

    name: str
    params: dict[str, Any]  # as the sweep file wrote it
    args: dict[str, str]  # flag name -> value on the command line
    num_steps: int | None  # the resolved config's train.num_steps, if it has one

    def command(self, main: Sequence[str], workdir: str, extra: Sequence[str] = ()) -> list[str]:
        flags = [f"--{key}={value}" for key, value in self.args.items()]
        return [*main, flags[0], f"--workdir={workdir}", *flags[1:], *extra]


def flag_value(value: Any) -> str:
    """The command-line text ml_collections' config flags parse back into `value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def default_name(params: dict[str, Any]) -> str:
    """The config argument, then leaf=value per override: local_codebook=4096_projector=none."""
    path, _, arg = params["config"].partition(":")
    parts = [_slug(item) for item in arg.split(",") if item]
    parts += [f"{key.rsplit('.', 1)[-1]}={_slug(flag_value(value))}"
              for key, value in params.items() if key != "config"]
    return "_".join(parts) or _slug(os.path.splitext(os.path.basename(path))[0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def load_sweep(path: str) -> list[Run]:
    """Expand and check the sweep file at `path` (see the module docstring for the format)."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} not found")
    spec = importlib.util.spec_from_file_location(f"fvq_sweep_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"{path} defines no get_sweep() returning the list of runs")
    entries = module.get_sweep()
    if not isinstance(entries, (list, tuple)) or not entries:
        raise SweepError(f"{path}: get_sweep() must return a non-empty list of dicts, got {entries!r}")
    namer: Callable[[dict], str] = getattr(module, "name", default_name)
    configs = _ConfigLoader()
    runs, seen = [], {}
    for index, params in enumerate(entries):
        where = f"{path}: run {index}"
        args = _check_params(params, where)
        name = namer(dict(params))
        if not isinstance(name, str) or not re.fullmatch(_NAME_PATTERN, name):
            raise SweepError(f"{where}: name {name!r} is not a usable directory name "
                             f"(letters, digits and ._=+- only, not starting with a symbol)")
        if name in seen:
            raise SweepError(f"{where}: the name {name!r} is also run {seen[name]}'s; "
                             "make name(params) tell them apart")
        seen[name] = index
        runs.append(Run(name, dict(params), args, configs.num_steps(params, where)))
    return runs


def _check_params(params: Any, where: str) -> dict[str, str]:
    if not isinstance(params, dict):
        raise SweepError(f"{where}: expected a dict of flags, got {params!r}")
    if not isinstance(params.get("config"), str) or not params["config"]:
        raise SweepError(f"{where}: needs 'config': 'path/to/config.py[:arg]'")
    args = {"config": params["config"]}
    for key, value in params.items():
        if key == "config":
            continue
        if not isinstance(key, str) or not re.fullmatch(_FIELD_PATTERN, key):
            raise SweepError(f"{where}: unknown key {key!r}; a run has 'config' and 'config.<field>' keys "
                             "(--workdir is set per run)")
        items = value if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(item, _SCALARS) for item in items):
            raise SweepError(f"{where}: {key} = {value!r} is not a str, int, float, bool or a tuple of them")
        args[key] = flag_value(value)
    return args


class _ConfigLoader:
    """Builds each run's config the way fvq_jax.main would, to check the overrides up front."""

    def __init__(self):
        self._modules = {}

    def num_steps(self, params: dict[str, Any], where: str) -> int | None:
        """The run's train.num_steps, after its overrides and the task's config checks passed."""
        config = self._config(params["config"], where)
        for key, value in params.items():
            if key != "config":
                _override(config, key, value, where)
        from fvq_jax import config_lib, tasks

        try:
            tasks.resolve(config)  # device counts are the job's business: not checked here
        except config_lib.ConfigError as e:
            raise SweepError(f"{where}: {e}") from e
        train = config.get("train")
        return train.get("num_steps") if train is not None else None

    def _config(self, spec: str, where: str):
        path, has_arg, arg = spec.partition(":")
        if path not in self._modules:
            if not os.path.isfile(path):
                raise SweepError(f"{where}: config file {path} not found (paths are relative to the "
                                 f"directory the sweep runs from: {os.getcwd()})")
            module_spec = importlib.util.spec_from_file_location(f"fvq_sweep_config_{len(self._modules)}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            self._modules[path] = module
        try:
            return self._modules[path].get_config(arg) if has_arg else self._modules[path].get_config()
        except ValueError as e:
            raise SweepError(f"{where}: {spec}: {e}") from e


def _override(config, key: str, value: Any, where: str) -> None:
    import ml_collections

    node = config
    *parents, leaf = key.split(".")[1:]
    for depth, part in enumerate(parents):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict):
            raise SweepError(f"{where}: {key}: config.{'.'.join(parents[:depth + 1])} is not a config block")
    if leaf not in node:
        block = ".".join(["config", *parents])
        raise SweepError(f"{where}: {key}: no such field; {block} has {sorted(node.keys())}")
    current = node[leaf]
    if isinstance(value, bool) and current is not None and not isinstance(current, bool):
        raise SweepError(f"{where}: {key} = {value!r}: the field holds {type(current).__name__}, not bool")
    try:
        node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
        raise SweepError(f"{where}: {key} = {value!r}: the field holds {type(current).__name__}") from e


def select(runs: list[Run], only: str | None) -> list[Run]:
    """The runs whose name matches the regular expression `only` (all when None)."""
    if not only:
        return runs
    chosen = [run for run in runs if re.search(only, run.name)]
    if not chosen:
        raise SweepError(f"--only={only!r} matches none of {[run.name for run in runs]}")
    return chosen


def is_finished(workdir: str, num_steps: int | None) -> bool:
    """The trainer wrote its final evaluation and (when known) logged step `num_steps`."""
    if not os.path.isfile(os.path.join(workdir, FINAL_EVAL)):
        return False
    if num_steps is None:
        return True
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        return bool(lines) and json.loads(lines[-1]).get("step", -1) >= num_steps
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class _Outcome:
    status: str  # pending | running | finished | incomplete | failed | interrupted
    returncode: int | None = None
    seconds: float | None = None


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted()


def run_sweep(runs: list[Run], selected: list[Run], *, sweep_path: str, root: str, main: Sequence[str],
              extra: Sequence[str] = (), parallel: int = 1, gpus_per_run: int = 0, poll_s: float = 0.2) -> bool:
    """Run the unfinished runs of `selected`; True when all of them end finished."""
    workdir = {run.name: os.path.join(root, run.name) for run in runs}
    todo = []
    for run in selected:
        if is_finished(workdir[run.name], run.num_steps):
            print(f"skip {run.name}: finished", flush=True)
        else:
            todo.append(run)
    outcomes = {run.name: _Outcome("pending") for run in todo}
    # What an earlier invocation recorded: a run skipped as finished keeps its wall time; a run
    # resumed after an interruption or failure adds the new attempt's time to the earlier ones.
    previous = _previous_summary(root)
    earlier = {name: (previous.get(name, {}).get("seconds") or 0.0)
               if previous.get(name, {}).get("status") != "finished" else 0.0 for name in outcomes}
    os.makedirs(root, exist_ok=True)
    summary = functools.partial(_write_summary, runs, outcomes, previous, sweep_path=sweep_path, root=root,
                                main=main, extra=extra)
    summary()
    free_slots, running = list(range(parallel)), {}
    done = 0
    try:
        while todo or running:
            while todo and free_slots:
                run, slot = todo.pop(0), free_slots.pop(0)
                running[slot] = (run, *_start(run, workdir[run.name], main, extra, slot, gpus_per_run))
                outcomes[run.name].status = "running"
                print(f"start {run.name} (log: {os.path.join(workdir[run.name], 'stdout.log')})", flush=True)
            time.sleep(poll_s)
            for slot, (run, process, log, start) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[slot]
                free_slots.append(slot)
                done += 1
                finished = is_finished(workdir[run.name], run.num_steps)
                status = "failed" if process.returncode else "finished" if finished else "incomplete"
                seconds = round(earlier[run.name] + time.time() - start, 1)
                outcomes[run.name] = _Outcome(status, process.returncode, seconds)
                print(f"[{done}/{len(outcomes)}] {run.name}: {status} (exit {process.returncode}, "
                      f"{datetime.timedelta(seconds=round(time.time() - start))})", flush=True)
                summary()
    except (KeyboardInterrupt, _Interrupted):
        print(f"interrupted: sending SIGTERM to {len(running)} running job(s) so that they checkpoint", flush=True)
        for run, process, _, _ in running.values():
            process.send_signal(signal.SIGTERM)
        for run, process, log, start in running.values():
            process.wait()
            log.close()
            seconds = round(earlier[run.name] + time.time() - start, 1)
            outcomes[run.name] = _Outcome("interrupted", process.returncode, seconds)
        summary()
        raise
    return all(outcome.status == "finished" for outcome in outcomes.values())


def _start(run: Run, workdir: str, main, extra, slot: int, gpus_per_run: int):
    os.makedirs(workdir, exist_ok=True)
    command = run.command(main, workdir, extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus_per_run:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * gpus_per_run + i) for i in range(gpus_per_run))
    log = open(os.path.join(workdir, "stdout.log"), "a")
    log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(command)}\n")
    log.flush()
    # A session of its own: a terminal's Ctrl-C reaches only this runner, which then sends SIGTERM
    # (the trainer's checkpoint-and-exit signal) instead of interrupting jobs mid-step.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, log, time.time()


def _previous_summary(root: str) -> dict[str, dict]:
    """The runs of an earlier sweep.json under `root`, by name ({} when there is none)."""
    path = os.path.join(root, "sweep.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {entry["name"]: entry for entry in json.load(f).get("runs", [])}


def _write_summary(runs, outcomes, previous, *, sweep_path, root, main, extra) -> None:
    entries = []
    for run in runs:
        workdir = os.path.join(root, run.name)
        outcome = outcomes.get(run.name)
        status = ("finished" if is_finished(workdir, run.num_steps) else
                  outcome.status if outcome else "not started")
        entry = dict(name=run.name, status=status, params=run.params, workdir=workdir,
                     command=run.command(main, workdir, extra))
        before = previous.get(run.name, {})
        if outcome and outcome.returncode is not None:
            entry.update(returncode=outcome.returncode, seconds=outcome.seconds)
        elif "seconds" in before:
            entry.update(returncode=before.get("returncode"), seconds=before["seconds"])
        entries.append(entry)
    summary = dict(sweep=sweep_path, workdir_root=root,
                   updated=datetime.datetime.now().isoformat(timespec="seconds"), runs=entries)
    tmp = os.path.join(root, "sweep.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(root, "sweep.json"))


def print_dry_run(runs: list[Run], *, root: str, main: Sequence[str], extra: Sequence[str]) -> None:
    for run in runs:
        workdir = os.path.join(root, run.name)
        if is_finished(workdir, run.num_steps):
            print(f"# {run.name}: finished, skipped")
        else:
            print(f"# {run.name}")
            print(shlex.join(run.command(main, workdir, extra)))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep file defining get_sweep() (and optionally name())")
    parser.add_argument("--workdir_root", required=True, help="local folder; run workdirs go in ROOT/<run name>")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands of the runs to do and exit")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--only", help="run only the runs whose name matches this regular expression")
    parser.add_argument("--gpus_per_run", type=int, default=0,
                        help="with --parallel on a GPU machine: CUDA_VISIBLE_DEVICES gives the k-th concurrent "
                             "run GPUs k*N..k*N+N-1 (default 0: leave CUDA_VISIBLE_DEVICES alone)")
    parser.add_argument("--main", default=shlex.join([sys.executable, "-m", "fvq_jax.main"]),
                        help="the command that runs one job; the run's flags are appended "
                             "(default: this Python, -m fvq_jax.main)")
    args = parser.parse_args(argv)
    args.extra = extra
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    if args.gpus_per_run < 0:
        parser.error("--gpus_per_run must be >= 0")
    if "://" in args.workdir_root:
        parser.error("--workdir_root must be a local folder (for gs:// use launch/xm_launch.py or launch/tpu/)")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    # The jobs run `python -m fvq_jax.main` from here, which imports fvq_jax from this directory
    # first; the configs checked below import the same code.
    sys.path.insert(0, os.getcwd())
    try:
        runs = load_sweep(args.sweep)
        selected = select(runs, args.only)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root, main_command = os.path.abspath(args.workdir_root), shlex.split(args.main)
    if args.dry_run:
        print_dry_run(selected, root=root, main=main_command, extra=args.extra)
        return 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        ok = run_sweep(runs, selected, sweep_path=args.sweep, root=root, main=main_command, extra=args.extra,
                       parallel=args.parallel, gpus_per_run=args.gpus_per_run)
    except (KeyboardInterrupt, _Interrupted):
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"sweep {'finished' if ok else 'not finished'}: {os.path.join(root, 'sweep.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
