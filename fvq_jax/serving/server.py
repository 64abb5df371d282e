"""The serve task (configs/serve.py): a GPT run or export with its tokenizer, served over HTTP on this machine.

  python -m fvq_jax.main --config=configs/serve.py --workdir=GPT_RUN_OR_EXPORT

Loads the GPT (its newest checkpoint, EMA weights if kept) and the tokenizer that made its codes, compiles the
sampler at every batch size and the tokenizer's encoder and decoder, then serves app.py's routes with uvicorn
and prints `ready: http://HOST:PORT/`. SIGTERM or Ctrl-C stops taking connections, lets the requests in flight
finish, and exits 0. One process; on several devices every batch size must split over the data-parallel ones.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time

import jax
import ml_collections
import uvicorn
from absl import logging
from etils import epath
from fastapi import FastAPI

from fvq_jax import config_lib, sharding
from fvq_jax.data import codes as codes_data
from fvq_jax.models.load import Loaded, load_gpt, tokenizer_record
from fvq_jax.sampling.images import Painter, decoding_tokenizer
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.serving.app import make_app
from fvq_jax.serving.service import Service
from fvq_jax.sharding import MeshSpec


@dataclasses.dataclass(frozen=True)
class ServeSpec(config_lib.Spec):
    """configs/serve.py's `serve` block, resolved once (`resolve`); `sampling` holds a request's default settings."""

    sampling: SamplingConfig = config_lib.inline()
    host: str
    port: int  # 0: any free port
    batch_sizes: tuple[int, ...]  # ascending: the compiled batch sizes; a batch is padded to the next one
    max_images: int  # n of one request, at most
    max_wait_ms: float  # how long the first request of a batch waits for others to join it
    progress_steps: int  # a batch runs its positions in this many calls, reporting progress after each
    max_upload_bytes: int
    step: int  # GPT checkpoint; 0: the newest
    use_ema: bool
    tokenizer: str  # "": the tokenizer recorded with the GPT

    def __post_init__(self):
        config_lib.require(isinstance(self.host, str) and bool(self.host), "host",
                           f"must name an address, got {self.host!r}")
        config_lib.require_number(self.port, "port", strict=False, integer=True)
        config_lib.require(self.port < 2 ** 16, "port", f"must be < 65536, got {self.port}")
        sizes = tuple(self.batch_sizes) if isinstance(self.batch_sizes, (list, tuple)) else ()
        config_lib.require(bool(sizes) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
                           and list(sizes) == sorted(set(sizes)), "batch_sizes",
                           f"must be ascending positive ints, got {self.batch_sizes!r}")
        object.__setattr__(self, "batch_sizes", sizes)
        for name in ("max_images", "progress_steps", "max_upload_bytes"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        config_lib.require_number(self.max_wait_ms, "max_wait_ms", strict=False)
        config_lib.require_number(self.step, "step", strict=False, integer=True)
        config_lib.require(isinstance(self.use_ema, bool), "use_ema", f"must be true or false, got {self.use_ema!r}")
        config_lib.require(isinstance(self.tokenizer, str), "tokenizer", f"must be a string, got {self.tokenizer!r}")


@dataclasses.dataclass(frozen=True)
class ServeTaskSpec(config_lib.Spec):
    """configs/serve.py resolved: the `serve` block and the mesh the models run on."""

    serve: ServeSpec
    mesh: MeshSpec

    def check_devices(self, num_devices: int | None, num_processes: int | None) -> None:
        """ConfigError unless one process serves and every batch size splits over the data-parallel devices (None:
        not known, not checked)."""
        if num_processes is not None:
            config_lib.require(num_processes == 1, "serve", f"serves from one process, not {num_processes}")
        if num_devices is not None:
            for size in self.serve.batch_sizes:
                self.mesh.check_batch(size, "serve.batch_sizes", num_devices)


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None,
            num_processes: int | None = None) -> ServeTaskSpec:
    """configs/serve.py as a ServeTaskSpec; ConfigError naming `serve.<field>` / `mesh.<field>` for a bad value, or
    for devices it cannot serve on (when their counts are given)."""
    spec = ServeTaskSpec.from_config(config)
    spec.check_devices(num_devices, num_processes)
    return spec


def class_names(gpt: Loaded) -> tuple[str, ...] | None:
    """The class names of the codes the GPT was trained on (their manifest, `codes.dir` in its config), when that
    directory is still there and names them; None otherwise (an imported GPT, moved codes)."""
    directory = gpt.config.get("codes", {}).get("dir")
    try:
        names = codes_data.read_manifest(directory).get("class_names") if directory else None
    except (FileNotFoundError, ValueError) as error:
        logging.warning("classes by id only: the GPT's codes.dir %s (relative paths: to where this runs) does not "
                        "read: %s", directory, error)
        return None
    return tuple(names) if names and len(names) == gpt.config.model.num_classes else None


def load_service(task: ServeTaskSpec, workdir) -> tuple[Service, Loaded]:
    """The Service of the GPT in `workdir` and its tokenizer, on the task's mesh (not compiled yet:
    `Service.warm_up`)."""
    spec = task.serve
    mesh = sharding.make_mesh(task.mesh)
    with jax.set_mesh(mesh):
        gpt = load_gpt(workdir, step=spec.step or None, use_ema=spec.use_ema, mesh_cfg=task.mesh)
        tokenizer = decoding_tokenizer(spec.tokenizer, gpt, task.mesh, field="serve.tokenizer")
    painter = Painter(gpt.model, tokenizer.model, spec.sampling, guided=True, mesh=mesh, rules=task.mesh.rules)
    source = dict(gpt=dict(path=str(epath.Path(gpt.source).absolute()), step=gpt.step, weights=gpt.weights,
                           preset=gpt.config.model.preset), tokenizer=tokenizer_record(tokenizer))
    return make_service(spec, painter, class_names=class_names(gpt), source=source), gpt


def make_service(spec: ServeSpec, painter: Painter, *, class_names=None, source: dict | None = None) -> Service:
    """The Service `spec` describes around `painter` (built with guided=True)."""
    return Service(painter, batch_sizes=spec.batch_sizes, max_wait_s=spec.max_wait_ms / 1e3,
                   segments=min(spec.progress_steps, painter.seq_len), max_images=spec.max_images,
                   max_upload_bytes=spec.max_upload_bytes, class_names=class_names, source=source)


class BackgroundServer:
    """uvicorn serving `app` from a thread of this process, on a socket bound at construction (port 0: a free
    one, then in `port`). Signals stay with the caller: `stop()` is the graceful shutdown (no new connections,
    the requests in flight finish)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.socket = socket.create_server((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.socket]), name="uvicorn",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped while starting")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def serve(task: ServeTaskSpec, workdir) -> None:
    """Serve the GPT in `workdir` as `task` (`resolve`) says until SIGTERM / SIGINT (then finish the requests in
    flight and return)."""
    spec = task.serve
    # A signal while loading or compiling stops the server before it serves (the compile in flight finishes).
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service, gpt = load_service(task, workdir)
        try:
            print(f"compiling the sampler at batch sizes {list(spec.batch_sizes)} ...", flush=True)
            seconds = service.warm_up()
            if not stop.is_set():
                _serve_until(stop, BackgroundServer(make_app(service), spec.host, spec.port).start(),
                             f"serves {gpt.source} (step {gpt.step}, {gpt.weights} weights; compiled in "
                             f"{seconds:.1f} s)")
        finally:
            service.close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)


def _serve_until(stop: threading.Event, server: BackgroundServer, what: str) -> None:
    print(f"ready: {server.url} {what}", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.thread.is_alive():
                raise RuntimeError("the HTTP server stopped")
    finally:
        print("stopping: finishing the requests in flight", flush=True)
        server.stop()
