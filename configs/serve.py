"""Serve a GPT run (or an imported GPT) and its tokenizer over HTTP: a JSON API and a web page.

  pip install -e '.[serve]'
  python -m fvq_jax.main --config=configs/serve.py --workdir=workdir/gpt_photos
      -> "ready: http://127.0.0.1:8000/" (the page; the API under /api/, fvq_jax/serving/app.py);
  python -m fvq_jax.main --config=configs/serve.py:port=8080,batch=16,cfg=1.75 --workdir=imported/c2i_L_256

Requests arriving together share one compiled sampler: their images are sampled as the rows of one batch,
padded to the next of `batch_sizes` (all compiled at start-up). SIGTERM finishes the requests in flight and
exits 0. A request's settings default to the ones below (CFG 2.0 as configs/sample.py); cfg_scale >= 1.
"""

import ml_collections

from fvq_jax import config_lib, sharding

# Short argument keys -> (config field, a value of the field's type).
KEYS = {
    "host": ("serve.host", "127.0.0.1"),
    "port": ("serve.port", 8000),
    "batch": ("serve.batch_sizes", (1, 2, 4, 8)),
    "max_images": ("serve.max_images", 16),
    "cfg": ("serve.cfg_scale", 2.0),
    "step": ("serve.step", 0),
    "ema": ("serve.use_ema", True),
    "tokenizer": ("serve.tokenizer", ""),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS)


def base_config(_: set[str]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "serve"
    config.serve = dict(
        host="127.0.0.1",  # loopback: this machine only
        port=8000,  # 0: any free port (printed when ready)
        batch_sizes=(1, 2, 4, 8),  # compiled at start-up; a batch of b images runs padded to the next size
        max_images=16,  # images in one request, at most
        max_wait_ms=25.0,  # the first request of a batch waits this long for others to join it
        progress_steps=8,  # progress reported this many times while a batch is sampled
        max_upload_bytes=8 * 2 ** 20,  # encode / reconstruct uploads
        step=0,  # GPT checkpoint step; 0 = the newest
        use_ema=True,
        tokenizer="",  # '' = the tokenizer that made the GPT's codes (recorded in its config)
        # A request's defaults (each can be set per request):
        cfg_scale=2.0,
        cfg_schedule="constant",
        cfg_interval=(0.0, 1.0),
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    config.mesh = sharding.default_mesh_config()
    return config
