r"""Launch a sweep file (configs/sweeps/*.py, see launch/sweep.py) as an XManager experiment.

Each run becomes one Vertex AI job on one machine (default: 8 x A100) running
`python -m fvq_jax.main --config=... --workdir=WORKDIR_ROOT/<run name> --config.<field>=...` in a
container built from this checkout. Needs XManager, Docker (or Cloud Build) and a GCP project:

  pip install xmanager          # then see github.com/google-deepmind/xmanager#prerequisites
  export GOOGLE_CLOUD_BUCKET_NAME=my-bucket
  xmanager launch launch/xm_launch.py -- --sweep=configs/sweeps/example.py \
      --workdir_root=gs://my-bucket/sweeps/example [--only=REGEX] [--accelerator=a100 --accelerator_count=8]

A job that dies or is cancelled resumes from its newest checkpoint when the sweep is launched
again with the same --workdir_root (finished runs are not skipped here: XManager does not see the
bucket; use --only to pick the runs to relaunch).

  python launch/xm_launch.py --sweep=configs/sweeps/example.py --workdir_root=gs://my-bucket/sweeps/example --dry_run

prints the experiment instead (container, resources, one `python -m fvq_jax.main ...` line per job, as the
job's container runs it) without XManager, Docker or GCP.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags

# XManager defines absl flags of its own (e.g. the --xm_launch_script that `xmanager launch`
# passes), so it is imported before flag parsing; a missing install is reported by main().
try:
    from xmanager import xm, xm_local
except ImportError as e:
    xm = xm_local = None
    _XMANAGER_MISSING = e

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep as sweep_lib  # noqa: E402  (launch/sweep.py, next to this file)

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep() (and optionally name()).", required=True)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "gs:// folder; each run's workdir is <root>/<run name>.",
                                    required=True)
_ONLY = flags.DEFINE_string("only", None, "Launch only the runs whose name matches this regular expression.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: the sweep file's name).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "a100", "xm.ResourceType name of the GPU (a100, h100, ...).")
_ACCELERATOR_COUNT = flags.DEFINE_integer("accelerator_count", 8, "GPUs per job.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.12", "Docker base image of the job container.")
_JAX_SPEC = flags.DEFINE_string("jax_spec", "jax[cuda12]", "The jax requirement installed next to fvq_jax.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the experiment (container, resources, each job's command) and "
                                               "launch nothing; needs no XManager.")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docker_instructions(project_dir: str, jax_spec: str) -> list[str]:
    """Dockerfile lines: the checkout (configs/ included) at the image's working directory, installed."""
    return ["ENV LANG=C.UTF-8",
            f"COPY {project_dir}/ {project_dir}",
            f"WORKDIR {project_dir}",
            f"RUN python -m pip install --no-cache-dir {shlex.quote(jax_spec)} ."]


def job_args(run: sweep_lib.Run, workdir_root: str) -> dict[str, str]:
    """The run's fvq_jax.main flags as XManager args (a dict becomes --key=value)."""
    return {**run.args, "workdir": f"{workdir_root.rstrip('/')}/{run.name}"}


def print_dry_run(title: str, runs: list[sweep_lib.Run]) -> None:
    """The experiment main() would create: its container, resources and each job's command line."""
    print(f"# experiment {title!r}: {len(runs)} Vertex AI jobs, {_ACCELERATOR_COUNT.value} x {_ACCELERATOR.value} "
          f"each, in a {_BASE_IMAGE.value} container built from {REPO_ROOT}:")
    for line in docker_instructions(os.path.basename(REPO_ROOT), _JAX_SPEC.value):
        print(f"#   {line}")
    for run in runs:
        args = job_args(run, _WORKDIR_ROOT.value)
        print(shlex.join(["python", "-m", "fvq_jax.main", *(f"--{key}={value}" for key, value in args.items())]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if xm is None and not _DRY_RUN.value:
        sys.exit(f"error: launch/xm_launch.py needs XManager ({_XMANAGER_MISSING}): pip install xmanager, "
                 "then see https://github.com/google-deepmind/xmanager#prerequisites "
                 "(Docker or Cloud Build, gcloud auth, GOOGLE_CLOUD_BUCKET_NAME); "
                 "launch/sweep.py runs the same sweep on this machine without it")
    if not _WORKDIR_ROOT.value.startswith("gs://"):
        raise app.UsageError("--workdir_root must be a gs:// folder: the jobs run on other machines")
    sweep_path = os.path.abspath(_SWEEP.value)
    # Config paths in sweep files are relative to the repository root, the jobs' working directory.
    os.chdir(REPO_ROOT)
    sys.path.insert(0, REPO_ROOT)
    try:
        runs = sweep_lib.select(sweep_lib.load_sweep(sweep_path), _ONLY.value)
    except sweep_lib.SweepError as e:
        sys.exit(f"error: {e}")

    title = _TITLE.value or os.path.splitext(os.path.basename(sweep_path))[0]
    if _DRY_RUN.value:
        print_dry_run(title, runs)
        return
    with xm_local.create_experiment(experiment_title=title) as experiment:
        [executable] = experiment.package([xm.Packageable(
            executable_spec=xm.PythonContainer(
                path=REPO_ROOT, base_image=_BASE_IMAGE.value, entrypoint=xm.ModuleName("fvq_jax.main"),
                docker_instructions=docker_instructions(os.path.basename(REPO_ROOT), _JAX_SPEC.value)),
            executor_spec=xm_local.Vertex.Spec())])
        requirements = xm.JobRequirements(**{_ACCELERATOR.value: _ACCELERATOR_COUNT.value})
        for run in runs:
            experiment.add(xm.Job(executable=executable, executor=xm_local.Vertex(requirements=requirements),
                                  args=job_args(run, _WORKDIR_ROOT.value)))
            print(f"added {run.name}")


if __name__ == "__main__":
    app.run(main)
