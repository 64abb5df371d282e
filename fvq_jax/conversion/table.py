"""Name tables between our parameters and a torch state dict: rows, transform hooks, strict checks.

A table is one `Row` per parameter: our path (slash-separated, as `nnx.to_flat_state` spells it, list
indices as numbers), the torch state-dict key, and the `Hook` that turns the torch layout into ours and
back. Arrays convert one at a time (`to_ours`, `to_torch`), so a model converts with little more memory
than its output. Pure numpy: no torch here (files are read in `torch_files`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- hooks


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch conv OIHW -> flax HWIO."""
    return np.transpose(weight, (2, 3, 1, 0))


def conv_weight(kernel: np.ndarray) -> np.ndarray:
    """flax HWIO -> torch conv OIHW."""
    return np.transpose(kernel, (3, 2, 0, 1))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear [out, in] <-> flax [in, out] (its own inverse)."""
    return np.transpose(weight)


@dataclasses.dataclass(frozen=True)
class Hook:
    """A layout change and its inverse."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


AS_IS = Hook("as is", lambda x: x, lambda x: x)
CONV = Hook("conv OIHW <-> HWIO", conv_kernel, conv_weight)
LINEAR = Hook("Linear [out, in] <-> [in, out]", linear_kernel, linear_kernel)


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str
    torch: str
    hook: Hook = AS_IS

    def torch_shape(self, our_shape: Shape) -> Shape:
        """The shape the torch tensor must have for our parameter of `our_shape` (nothing is allocated)."""
        return tuple(self.hook.to_torch(np.broadcast_to(np.float32(0), our_shape)).shape)


# ----------------------------------------------------------------------------- state dicts


class StateDict(Mapping[str, np.ndarray]):
    """A torch state dict read one array at a time: every key's shape known up front, an array loaded
    (as numpy) only when it is looked up. `metadata`: string facts the file carried (may be empty);
    `entry`: where in a nested checkpoint the state dict was (None: the top level)."""

    def __init__(self, shapes: Mapping[str, Shape], load: Callable[[str], np.ndarray],
                 metadata: Mapping[str, str] | None = None, entry: str | None = None):
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self._load = load
        self.metadata = dict(metadata or {})
        self.entry = entry

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> "StateDict":
        """An in-memory state dict ({key: numpy array}, e.g. a fixture's) as a StateDict."""
        if isinstance(arrays, StateDict):
            return arrays
        return cls({k: np.shape(v) for k, v in arrays.items()}, lambda k: np.asarray(arrays[k]))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def setting(explicit, metadata: Mapping[str, str], key: str, default, parse):
    """An explicit argument, else what a file we wrote recorded (`StateDict.metadata[key]`, parsed), else the
    default."""
    if explicit is not None:
        return explicit
    return parse(metadata[key]) if key in metadata else default


# Keys that say what a reference state dict holds: a kind's anchors are the keys its architecture is read from.
KINDS = {
    "tokenizer": ("a VQ tokenizer", ("encoder.conv_in.weight", "quantize.embedding.weight")),
    "gpt": ("a LlamaGen GPT", ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")),
}


class WrongKind(ValueError):
    """The state dict is not of the kind asked for (e.g. a GPT given as a tokenizer)."""


def check_kind(keys: Iterable[str], kind: str) -> None:
    """WrongKind, naming what the state dict is instead when another kind's anchors are there, unless it has
    all of `kind`'s anchor keys."""
    keys = set(keys)
    name, anchors = KINDS[kind]
    if all(anchor in keys for anchor in anchors):
        return
    for other, (other_name, other_anchors) in KINDS.items():
        found = [anchor for anchor in other_anchors if anchor in keys]
        if other != kind and found:
            raise WrongKind(f"this is {other_name} state dict (it has {', '.join(found)}), not {name}: "
                            f"convert it as kind {other!r}")
    raise WrongKind(f"not {name} state dict: no {' or '.join(a for a in anchors if a not in keys)}; "
                    f"its {len(keys)} keys begin {sorted(keys)[:6]}")


class StateDictMismatch(ValueError):
    """A state dict whose keys or shapes differ from the table; the message lists every difference."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
        parts = [f"{what}: the state dict does not match"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(f"  {label} ({len(items)}): " + ", ".join(items))
        super().__init__("\n".join(parts))
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_source(shapes: Mapping[str, Shape], rows: Iterable[Row], our_shapes: Mapping[str, Shape], *,
                 ignored: Iterable[str] = (), what: str = "torch state dict") -> None:
    """Raise StateDictMismatch listing ALL missing, unexpected and mis-shaped torch keys.

    shapes: the torch state dict's {key: shape}; our_shapes: {our path: shape} of the model to fill;
    ignored: torch keys that are known and deliberately not converted (buffers that hold no weights).
    """
    rows = list(rows)
    known = {row.torch for row in rows} | set(ignored)
    missing = [row.torch for row in rows if row.torch not in shapes]
    unexpected = [key for key in shapes if key not in known]
    misshaped = []
    for row in rows:
        if row.torch in shapes:
            want = row.torch_shape(our_shapes[row.ours])
            if tuple(shapes[row.torch]) != want:
                misshaped.append(f"{row.torch} {_fmt(shapes[row.torch])} (expected {_fmt(want)})")
    if missing or unexpected or misshaped:
        raise StateDictMismatch(what, missing, unexpected, misshaped)


def check_covers(rows: Iterable[Row], our_shapes: Mapping[str, Shape]) -> None:
    """The table names every parameter of our model once, and nothing else (a table bug otherwise)."""
    ours = [row.ours for row in rows]
    extra = sorted(set(ours) - set(our_shapes))
    uncovered = sorted(set(our_shapes) - set(ours))
    twice = sorted({p for p in ours if ours.count(p) > 1})
    if extra or uncovered or twice:
        raise ValueError(f"conversion table does not fit the model: rows for no parameter {extra}, "
                         f"parameters without a row {uncovered}, rows repeated {twice}")


# ----------------------------------------------------------------------------- conversion


class NonFiniteWeights(ValueError):
    """Torch tensors holding NaN or Inf values; the message names every one."""

    def __init__(self, tensors: list[str], total: int):
        super().__init__(f"non-finite weights in {len(tensors)} of {total} tensors (the model would compute NaN; "
                         f"a GPT would sample all-zero codes):\n  " + "\n  ".join(tensors))
        self.tensors = tensors


def to_ours(read: Callable[[str], np.ndarray], rows: Iterable[Row],
            dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(our path, array in our layout) for every row, reading one torch tensor at a time.

    After the last row, NonFiniteWeights names every tensor that held NaN or Inf (as our dtype), so that one
    pass reports all of them.
    """
    rows = list(rows)
    non_finite = []
    for row in rows:
        array = np.ascontiguousarray(row.hook.to_ours(np.asarray(read(row.torch))), dtype=dtype)
        if not np.isfinite(array).all():
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            non_finite.append(f"{row.torch}: {nan} NaN, {inf} Inf of {array.size} values")
        yield row.ours, array
    if non_finite:
        raise NonFiniteWeights(non_finite, len(rows))


def to_torch(read: Callable[[str], np.ndarray], rows: Iterable[Row]) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, array in torch layout) for every row, reading one of our arrays at a time."""
    for row in rows:
        yield row.torch, np.ascontiguousarray(row.hook.to_torch(np.asarray(read(row.ours))))


def split_path(path: str) -> tuple[str | int, ...]:
    """'encoder/levels/0/res/1/conv1/kernel' -> ('encoder', 'levels', 0, 'res', 1, 'conv1', 'kernel')."""
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def nest(items: Iterable[tuple[str, object]]) -> dict:
    """{path: leaf} pairs -> the nested dict `nnx.to_pure_dict` gives (list elements under int keys)."""
    out: dict = {}
    for path, leaf in items:
        *parents, last = split_path(path)
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def leaf_shapes(tree: Mapping) -> dict[str, Shape]:
    """{our path: shape} of a nested dict of arrays or ShapeDtypeStructs (e.g. `nnx.to_pure_dict` of an abstract
    model's parameters)."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """The inverse of `nest`: a nested dict -> {slash-separated path: leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out
