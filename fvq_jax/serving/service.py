"""What the server does, without HTTP: the checks of a request's values and the model work behind each route.

A `Service` holds the front end (sampling/images.py Painter: the GPT and its tokenizer, compiled once), the
batcher that shares its sampler among the requests in flight, the class names and the limits. Every bad value
raises `RequestError` naming the request field; the HTTP layer (app.py) turns it into a 4xx response.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
from PIL import Image

from fvq_jax import config_lib
from fvq_jax.data import transforms
from fvq_jax.sampling.images import MAX_SEED, Painter
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.serving.batcher import Batcher, Listener, Ticket

SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
MAX_PIXELS = 50_000_000  # an upload with more pixels is refused before it is decoded (decompression bombs)


class RequestError(ValueError):
    """A request value the server cannot use: the HTTP `status` (4xx) and the request `field` it names."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


@dataclasses.dataclass(frozen=True)
class Generation:
    """A checked generate request: `n` images of class `label`, samples first_index ... first_index + n - 1 of
    `seed` (the sampling job's sample i of that seed and class, with the same settings, is the same image)."""

    label: int
    n: int
    seed: int
    first_index: int
    settings: SamplingConfig

    def record(self, class_names) -> dict:
        return dict(label=self.label, class_name=class_names[self.label], n=self.n, seed=self.seed,
                    indices=list(range(self.first_index, self.first_index + self.n)),
                    settings=dataclasses.asdict(self.settings))


class Service:
    """The GPT (through `painter`) and its tokenizer behind the server's routes."""

    def __init__(self, painter: Painter, *, batch_sizes: tuple[int, ...], max_wait_s: float, segments: int,
                 max_images: int, max_upload_bytes: int, class_names=None, source: dict | None = None):
        self.painter = painter
        self.batcher = Batcher(painter, batch_sizes, max_wait_s=max_wait_s, segments=segments)
        self.max_images, self.max_upload_bytes = max_images, max_upload_bytes
        self.class_names = tuple(class_names or (f"class {c}" for c in range(painter.num_classes)))
        self.source = source or {}
        self.compile_seconds: float | None = None

    def warm_up(self) -> float:
        """Compile the sampler at every batch size, the encoder and the decoder; returns the seconds it took."""
        start = time.perf_counter()
        self.batcher.warm_up()
        self.decode(self.encode(np.zeros((self.painter.image_size,) * 2 + (3,), np.uint8)))
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def close(self) -> None:
        self.batcher.close()

    def info(self) -> dict:
        p = self.painter
        return dict(classes=[dict(id=c, name=name) for c, name in enumerate(self.class_names)],
                    num_classes=p.num_classes, grid=p.grid, image_size=p.image_size,
                    codebook_size=p.codebook_size, max_images=self.max_images,
                    max_upload_bytes=self.max_upload_bytes, batch_sizes=list(self.batcher.batch_sizes),
                    defaults=dataclasses.asdict(p.config), model=self.source)

    # ------------------------------------------------------------------------------------------ generate

    def generation(self, class_: int | str, *, n: int, seed: int, first_index: int, settings: dict) -> Generation:
        """A generate request's values checked; `settings` overrides the defaults (None values: the default)."""
        if isinstance(class_, str):
            if class_ not in self.class_names:
                raise RequestError("class", f"unknown class name {class_!r}; GET /api/classes lists them")
            label = self.class_names.index(class_)
        else:
            label = class_
            if not 0 <= label < self.painter.num_classes:
                raise RequestError("class", f"must be a class id in 0 ... {self.painter.num_classes - 1} or a name, "
                                   f"got {label}")
        if not 1 <= n <= self.max_images:
            raise RequestError("n", f"must be in 1 ... {self.max_images} (serve.max_images), got {n}")
        if not 0 <= seed < MAX_SEED:
            raise RequestError("seed", f"must be in 0 ... {MAX_SEED - 1}, got {seed}")
        if not 0 <= first_index <= MAX_SEED - n:
            raise RequestError("first_index", f"must be in 0 ... {MAX_SEED - n}, got {first_index}")
        given = {k: v for k, v in settings.items() if v is not None}
        try:
            sampling = dataclasses.replace(self.painter.config, **given)
        except config_lib.ConfigError as error:
            raise RequestError(error.field, error.detail) from None
        return Generation(label, n, seed, first_index, sampling)

    def submit(self, generation: Generation, listener: Listener | None = None) -> Ticket:
        g = generation
        return self.batcher.submit(np.full(g.n, g.label), np.full(g.n, g.seed),
                                   g.first_index + np.arange(g.n), g.settings, listener)

    # ------------------------------------------------------------------------------- encode and decode

    def image(self, data: bytes) -> np.ndarray:
        """An uploaded image file -> uint8 [S, S, 3]: short side resized to S = the images' size, center crop."""
        if len(data) > self.max_upload_bytes:
            raise self.upload_too_large()
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise RequestError("image", f"{image.width} x {image.height} pixels is more than {MAX_PIXELS:,}",
                                   status=413)
            image = image.convert("RGB")
        except RequestError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever PIL cannot read is not an image here
            raise RequestError("image", f"not an image that PIL reads ({type(error).__name__}: {error})",
                               status=415) from None
        return transforms.center_crop(image, self.painter.image_size)

    def upload_too_large(self) -> RequestError:
        return RequestError("image", f"the upload holds more than {self.max_upload_bytes:,} bytes "
                            "(serve.max_upload_bytes)", status=413)

    def codes(self, codes) -> np.ndarray:
        """A decode request's codes (grid x grid nested, or N flat) -> int32 [N]."""
        p = self.painter
        array = np.asarray(codes, dtype=object)
        if array.shape not in ((p.grid, p.grid), (p.seq_len,)):
            raise RequestError("codes", f"must be {p.grid} x {p.grid} codes (or {p.seq_len} in a row), got shape "
                               f"{array.shape}")
        array = array.astype(np.int64).ravel()
        if ((array < 0) | (array >= p.codebook_size)).any():
            raise RequestError("codes", f"must be in 0 ... {p.codebook_size - 1}, got {array.min()} ... {array.max()}")
        return array.astype(np.int32)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] -> the tokenizer's codes [N]."""
        return self.painter.encode(self._pad(image[None]))[0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [N] -> uint8 image [S, S, 3]."""
        return self.painter.decode(self._pad(codes[None]))[0]

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """One row as the smallest batch (a batch size divides over the devices; one image may not)."""
        return np.repeat(x, self.batcher.batch_sizes[0], axis=0)
