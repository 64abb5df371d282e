import pytest

from tests.sampling.gpt_export import write_codes_manifest, write_gpt_export


@pytest.fixture(scope="session")
def gpt_export(tiny_run, tmp_path_factory):
    """A random GPT-tiny export (10 named classes, K = 64, 4 x 4 tokens) decoded by the tiny tokenizer run."""
    root = tmp_path_factory.mktemp("gpt_export")
    return write_gpt_export(root / "gpt", dict(path=tiny_run[0], step=2, weights="ema"),
                            codes_dir=write_codes_manifest(root / "codes"))
