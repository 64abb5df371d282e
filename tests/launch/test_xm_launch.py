"""launch/xm_launch.py against a stub of the XManager API it uses (XManager is not installed here),
its --dry_run (the same jobs, printed, without XManager), and its message when XManager is missing."""

import json
import shlex
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, subprocess_env

# The slice of the public API xm_launch.py calls (xmanager.xm / xmanager.xm_local, checked against
# google-deepmind/xmanager), recording what the experiment receives.
STUB = {
    "xmanager/__init__.py": "",
    "xmanager/xm.py": """
        class ModuleName:
            def __init__(self, module_name):
                self.module_name = module_name

        class PythonContainer:
            def __init__(self, entrypoint, path=".", base_image=None, docker_instructions=None):
                self.entrypoint, self.path = entrypoint, path
                self.base_image, self.docker_instructions = base_image, docker_instructions

        class Packageable:
            def __init__(self, executable_spec, executor_spec, args=None, env_vars=None):
                self.executable_spec, self.executor_spec = executable_spec, executor_spec

        class JobRequirements:
            def __init__(self, resources=None, **kw_resources):
                self.resources = kw_resources

        class Job:
            def __init__(self, executable, executor, args=None, env_vars=None):
                self.executable, self.executor, self.args = executable, executor, args
    """,
    "xmanager/xm_local.py": """
        import json, os

        class Vertex:
            class Spec:
                pass

            def __init__(self, requirements=None):
                self.requirements = requirements

        class _Experiment:
            def __init__(self, title):
                self.record = dict(title=title, packages=[], jobs=[])

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                with open(os.environ["XM_STUB_RECORD"], "w") as f:
                    json.dump(self.record, f)

            def package(self, packageables):
                for p in packageables:
                    spec = p.executable_spec
                    self.record["packages"].append(dict(
                        path=spec.path, module=spec.entrypoint.module_name, base_image=spec.base_image,
                        docker=spec.docker_instructions, vertex=isinstance(p.executor_spec, Vertex.Spec)))
                return [f"executable{i}" for i in range(len(packageables))]

            def add(self, job):
                self.record["jobs"].append(dict(executable=job.executable, args=job.args,
                                                resources=job.executor.requirements.resources))

        def create_experiment(experiment_title):
            return _Experiment(experiment_title)
    """,
}


def launch(*args, pythonpath=None, env=None):
    env = subprocess_env(**(env or {}))
    if pythonpath:
        env["PYTHONPATH"] = f"{pythonpath}:{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, "launch/xm_launch.py", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)


def test_sweep_becomes_one_vertex_job_per_run(tmp_path):
    for path, text in STUB.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    record = tmp_path / "record.json"
    result = launch("--sweep=configs/sweeps/example.py", "--workdir_root=gs://bucket/sweeps/example/",
                    "--only=S4$", "--accelerator_count=4", pythonpath=tmp_path, env=dict(XM_STUB_RECORD=record))
    assert result.returncode == 0, result.stderr
    experiment = json.loads(record.read_text())
    assert experiment["title"] == "example"
    [package] = experiment["packages"]
    assert package == dict(path=str(ROOT), module="fvq_jax.main", base_image="python:3.12", vertex=True, docker=[
        "ENV LANG=C.UTF-8", f"COPY {ROOT.name}/ {ROOT.name}", f"WORKDIR {ROOT.name}",
        "RUN python -m pip install --no-cache-dir 'jax[cuda12]' ."])
    assert experiment["jobs"] == [
        dict(executable="executable0", resources={"a100": 4},
             args={"config": "configs/tokenizer.py:local", "config.quantizer.codebook_size": str(k),
                   "config.quantizer.projector": "S/4", "workdir": f"gs://bucket/sweeps/example/k{k}_S4"})
        for k in (1024, 4096)]


def test_missing_xmanager_says_how_to_install_it():
    result = launch("--sweep=configs/sweeps/example.py", "--workdir_root=gs://bucket/sweeps/example")
    assert result.returncode == 1
    assert "needs XManager" in result.stderr and "pip install xmanager" in result.stderr


def test_dry_run_prints_the_jobs_the_experiment_gets(tmp_path):
    """Without XManager: the container and one fvq_jax.main command per job, the args the stub receives above."""
    result = launch("--sweep=configs/sweeps/example.py", "--workdir_root=gs://bucket/sweeps/example",
                    "--only=S4$", "--accelerator=h100", "--accelerator_count=4", "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"# experiment 'example': 2 Vertex AI jobs, 4 x h100 each, in a python:3.12 container built "
                        f"from {ROOT}:")
    assert lines[1:5] == [f"#   {line}" for line in (
        "ENV LANG=C.UTF-8", f"COPY {ROOT.name}/ {ROOT.name}", f"WORKDIR {ROOT.name}",
        "RUN python -m pip install --no-cache-dir 'jax[cuda12]' .")]
    assert [shlex.split(line) for line in lines[5:]] == [
        ["python", "-m", "fvq_jax.main", "--config=configs/tokenizer.py:local",
         f"--config.quantizer.codebook_size={k}", "--config.quantizer.projector=S/4",
         f"--workdir=gs://bucket/sweeps/example/k{k}_S4"] for k in (1024, 4096)]
