"""`python -m fvq_jax.benchmarks.serve --tiny` through its main: both phases run, every request is answered,
batched requests meet in the batcher and get the images they got alone."""

import json

from fvq_jax.benchmarks import serve


def test_the_tiny_load_benchmark(tmp_path):
    out = tmp_path / "serve.jsonl"
    result = serve.main(["--tiny", "--out", str(out)])
    written = json.loads(out.read_text().splitlines()[-1])
    assert written["what"] == "serve" and written["preset"] == "GPT-tiny"
    clients, requests = serve.TINY["clients"], serve.TINY["requests"]
    assert result["requests"] == 2 * clients * requests and result["errors"] == 0
    assert result["compared"] == clients * requests and result["differ"] == 0
    assert result["mean_batch"] > 1  # the clients' requests shared batches
    assert result["latency_images"] == 2 and result["latency_s"] > 0 and result["peak_rss_GiB"] > 0
