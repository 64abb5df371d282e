"""Tiny GPTs for the model, loss and sampler tests, and the torch fixture (tests/fixtures/gpt_tiny.npz)."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.conversion import gpt as conversion
from fvq_jax.conversion.table import flatten, nest
from fvq_jax.models.gpt import GPT, GPTConfig, stack_layers

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gpt_tiny.npz"

# dim 32, 2 heads of 16 (4 rotary frequencies per axis), 2 layers, K = 64, a 4 x 4 grid, 5 classes.
TINY = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=5, grid=4)


def random_gpt(config: GPTConfig = TINY, seed: int = 0, **kwargs) -> GPT:
    """A GPT whose every parameter is random (the output layer too, which init leaves at zero), scaled so
    that the logits spread over a few units: N(0, 1) embeddings, 1 + N(0, 0.1) norm scales, N(0, 1/fan_in)
    matrices with fan_in the width they contract. Drawn in the looped layout, so a scanned GPT of the same
    seed holds the same weights, stacked."""
    def abstract(config):
        return nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(seed), **kwargs)), nnx.Param, ...)

    _, looped, _ = abstract(dataclasses.replace(config, scan_layers=False))
    rng = np.random.default_rng(seed)
    values = {}
    for path, leaf in nnx.to_flat_state(looped):
        name = "/".join(map(str, path))
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name.endswith("scale"):
            values[name] = 1.0 + 0.1 * noise
        elif name.endswith("embedding"):
            values[name] = noise
        else:
            fan_in = config.ffn_dim if name.endswith("w2/kernel") else config.dim
            values[name] = noise / np.sqrt(fan_in)
    values = nest(values.items())
    graph, params, rest = abstract(config)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, stack_layers(values) if config.scan_layers else values))
    return nnx.merge(graph, params, rest)


def param_arrays(model: GPT) -> dict[str, np.ndarray]:
    """{our path ('layers/0/attention/wqkv/kernel'; scanned: 'layers/attention/wqkv/kernel'): numpy array} of a
    model's parameters."""
    return {path: np.asarray(v) for path, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _forward(graphdef, params, tokens, labels, dropout_key, train, method):
    return getattr(nnx.merge(graphdef, params), method)(tokens, labels, train=train, dropout_key=dropout_key)


def forward(model: GPT, tokens: jax.Array, labels: jax.Array, *, train: bool = False,
            dropout_key: jax.Array | None = None, method: str = "__call__") -> jax.Array:
    """model.method(tokens, labels, ...) jitted: one compilation per model structure, not one per eager op."""
    graphdef, params = nnx.split(model)
    return _forward(graphdef, params, tokens, labels, dropout_key, train, method)


def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def fixture_state_dict() -> dict[str, np.ndarray]:
    """The reference GPT's state dict in the fixture (torch key -> numpy)."""
    return {k[len("sd/"):]: v for k, v in fixture().items() if k.startswith("sd/")}


def fixture_gpt(dtype=jnp.float32, scan_layers: bool = False) -> GPT:
    """The fixture's reference weights in our GPT (dim 64, 2 layers, 4 heads, K 256, 4 x 4, 10 classes)."""
    state = fixture_state_dict()
    config = conversion.infer_config(state, n_head=4, grid=4, scan_layers=scan_layers)
    return conversion.from_torch(state, config, dtype=dtype)
