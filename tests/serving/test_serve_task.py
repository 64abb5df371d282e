"""`python -m fvq_jax.main --config=configs/serve.py --workdir=GPT`: ready line, a request, SIGTERM with the request
in flight (it completes; the process exits 0); config errors before anything is loaded."""

import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from fvq_jax import config_lib, tasks
from tests.conftest import ROOT, subprocess_env


def _serve(workdir, *flags):
    return subprocess.Popen([sys.executable, "-m", "fvq_jax.main", "--config=configs/serve.py:port=0,batch=(1,4)",
                             f"--workdir={workdir}", *flags], cwd=ROOT, env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(gpt_export):
    # A request's rows wait up to 3 s for others to join them: SIGTERM arrives while they wait.
    process = _serve(gpt_export, "--config.serve.max_wait_ms=3000")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 400
    while not any(line.startswith("ready: ") for line in lines):
        assert process.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    url = re.search(r"ready: (http://127\.0\.0\.1:\d+/)", "".join(lines)).group(1)
    with httpx.Client(base_url=url, timeout=120) as client:
        result = {}
        request = threading.Thread(target=lambda: result.update(
            response=client.post("/api/generate", json={"class": 2, "n": 2, "seed": 4})))
        request.start()
        while client.get("/api/health").json()["pending"] == 0:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        request.join(60)
    assert process.wait(60) == 0, "".join(lines)[-3000:]
    reader.join(10)
    response = result["response"]
    assert response.status_code == 200 and len(response.json()["images"]) == 2
    assert "stopping: finishing the requests in flight" in "".join(lines) and lines[-1].strip() == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/health")


@pytest.mark.parametrize("field,value", [("batch_sizes", (4, 2)), ("batch_sizes", ()), ("port", 70000),
                                         ("max_images", 0), ("cfg_scale", -1.0), ("top_p", 0.0),
                                         ("max_wait_ms", -1.0), ("progress_steps", 0)])
def test_bad_serve_config_names_the_field(field, value):
    config = config_lib.load_file(ROOT / "configs" / "serve.py").get_config()
    config.serve[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config field serve.{field}: "):
        tasks.resolve(config)


def test_devices_it_cannot_serve_on_are_refused_before_anything_is_built():
    config = config_lib.load_file(ROOT / "configs" / "serve.py").get_config("batch=(2,4)")
    tasks.resolve(config, num_devices=2, num_processes=1)
    with pytest.raises(config_lib.ConfigError, match="config field serve.batch_sizes: 2 does not split over the 4 "):
        tasks.resolve(config, num_devices=4, num_processes=1)
    with pytest.raises(config_lib.ConfigError, match="config field serve: serves from one process, not 2"):
        tasks.resolve(config, num_devices=2, num_processes=2)
