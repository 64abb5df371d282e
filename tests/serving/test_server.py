"""The sampling server in this process (the task's own pieces: server.build_service, BackgroundServer, app.py):
the JSON API against the sampling job and the tokenizer, batched requests against the same requests alone, bad
requests, and one page visit in a headless browser."""

import base64
import concurrent.futures
import io
import json
import os
import shutil

import httpx
import jax
import numpy as np
import pytest
from PIL import Image

from fvq_jax import config_lib
from fvq_jax.data import transforms
from fvq_jax.data.value_range import to_model_range, to_uint8
from fvq_jax.models.load import load_tokenizer
from fvq_jax.sampling import job
from fvq_jax.serving import server
from fvq_jax.serving.app import make_app
from tests.sampling.gpt_export import CLASS_NAMES, CLASSES
from tests.train.tiny import ROOT

UPLOAD_LIMIT = 60_000


def serve_config(arg: str):
    return config_lib.load_file(ROOT / "configs" / "serve.py").get_config(arg)


@pytest.fixture(scope="module")
def served(gpt_export):
    """The task's service (batch sizes 1 and 4: the serve task's test and the sampling job's tests compile the
    same programs) behind a BackgroundServer."""
    config = serve_config("port=0,batch=(1,4),max_images=6")
    config.serve.update(max_upload_bytes=UPLOAD_LIMIT, progress_steps=4, max_wait_ms=50.0)
    service, _ = server.load_service(server.resolve(config, jax.device_count(), jax.process_count()), gpt_export)
    service.warm_up()
    background = server.BackgroundServer(make_app(service), "127.0.0.1", 0).start()
    with httpx.Client(base_url=background.url, timeout=120) as client:
        yield client, service
    background.stop()
    service.close()


@pytest.fixture(scope="module")
def job_samples(gpt_export, tmp_path_factory):
    """The sampling job's 20 samples (2 per class) at CFG 2.0, seed 3: sample i has class floor(i / 2)."""
    config = config_lib.load_file(ROOT / "configs" / "sample.py").get_config("n=20,batch=4,cfg=2.0,seed=3,grid=0")
    out = job.sample_run(job.resolve(config), gpt_export, out=tmp_path_factory.mktemp("job") / "samples")
    arrays = [dict(np.load(out / f)) for f in sorted(os.listdir(out)) if f.endswith(".npz")]
    return {k: np.concatenate([a[k] for a in arrays]) for k in ("arr_0", "codes", "indices")}


def pixels(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classes_and_health(served):
    client, _ = served
    assert client.get("/api/health").json()["ready"] is True
    info = client.get("/api/classes").json()
    assert [c["name"] for c in info["classes"]] == list(CLASS_NAMES)  # from the codes' manifest
    assert (info["num_classes"], info["grid"], info["image_size"], info["codebook_size"]) == (CLASSES, 4, 16, 64)
    assert info["defaults"]["cfg_scale"] == 2.0 and info["max_images"] == 6


def test_generated_images_are_the_sampling_jobs(served, job_samples):
    """Class 0 samples 0 and 1, and (by name, first_index) class 7's samples 14 and 15, of the job's seed."""
    client, _ = served
    for request, indices in (({"class": 0, "n": 2, "seed": 3}, [0, 1]),
                             ({"class": CLASS_NAMES[7], "n": 2, "seed": 3, "first_index": 14}, [14, 15])):
        response = client.post("/api/generate", json=request)
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["indices"] == indices and got["settings"]["cfg_scale"] == 2.0
        np.testing.assert_array_equal(np.asarray(got["codes"]), job_samples["codes"][indices])
        np.testing.assert_array_equal(np.stack([pixels(u) for u in got["images"]]), job_samples["arr_0"][indices])


def test_requests_batched_together_get_the_images_they_get_alone(served):
    client, service = served
    requests = [{"class": c, "n": n, "seed": s, "cfg_scale": cfg, "top_k": k, "temperature": t}
                for c, n, s, cfg, k, t in ((1, 1, 0, 1.0, 0, 1.0), (2, 3, 5, 3.0, 10, 0.8), (9, 2, 7, 2.0, 0, 1.3),
                                           (4, 1, 11, 1.5, 1, 1.0), (0, 2, 2, 4.0, 0, 1.0))]
    before = len(service.batcher.batches)
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.post("/api/generate", json=r).json(), requests))
    shared = service.batcher.batches[before:]
    assert max(shared) > 1 and sum(shared) == 9, shared  # rows of several requests ran in one batch
    for request, batched in zip(requests, together):
        before = len(service.batcher.batches)
        alone = client.post("/api/generate", json=request).json()
        assert service.batcher.batches[before:] == [request["n"]]
        assert alone["codes"] == batched["codes"] and alone["images"] == batched["images"], request


def test_the_stream_reports_progress_then_the_images(served):
    client, _ = served
    request = {"class": 5, "n": 3, "seed": 1, "cfg_schedule": "linear", "cfg_interval": [0.1, 0.9], "top_p": 0.9}
    with client.stream("POST", "/api/generate/stream", json=request) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        events = [json.loads(line) for line in response.iter_lines() if line]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("image") == 3
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 4
    whole = client.post("/api/generate", json=request).json()
    images = {e["slot"]: e["image"] for e in events if e["event"] == "image"}
    assert [images[i] for i in range(3)] == whole["images"]


def test_encode_decode_and_reconstruct_are_the_tokenizers(served, tiny_run):
    client, _ = served
    photo = (np.random.default_rng(0).random((30, 44, 3)) * 255).astype(np.uint8)
    upload = {"image": ("photo.png", png_bytes(photo), "image/png")}
    crop = transforms.center_crop(Image.fromarray(photo), 16)
    model = load_tokenizer(tiny_run[0], step=2).model  # the tokenizer itself, outside the server
    want_codes = np.asarray(jax.jit(lambda x: model.encode(to_model_range(x))[1])(crop[None]))[0]
    want_image = np.asarray(jax.jit(lambda c: to_uint8(model.decode_codes(c)))(want_codes[None]))[0]
    codes = client.post("/api/encode", files=upload).json()["codes"]
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    decoded = pixels(client.post("/api/decode", json={"codes": codes}).json()["image"])
    assert np.abs(decoded.astype(int) - want_image).max() <= 1
    result = client.post("/api/reconstruct", files=upload).json()
    np.testing.assert_array_equal(pixels(result["input"]), crop)
    np.testing.assert_array_equal(pixels(result["reconstruction"]), decoded)
    assert result["codes"] == codes
    mse = np.mean((crop.astype(float) - decoded) ** 2)
    assert result["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-4)


BAD_REQUESTS = [
    ("/api/generate", {"content": b'{"class": 3,', "headers": {"content-type": "application/json"}}, 422, "body"),
    ("/api/generate", {"json": {"class": 10}}, 422, "class"),
    ("/api/generate", {"json": {"class": -1}}, 422, "class"),
    ("/api/generate", {"json": {"class": "no such class"}}, 422, "class"),
    ("/api/generate", {"json": {"n": 2}}, 422, "class"),
    ("/api/generate", {"json": {"class": 1, "n": 7}}, 422, "n"),
    ("/api/generate", {"json": {"class": 1, "n": 0}}, 422, "n"),
    ("/api/generate", {"json": {"class": 1, "n": "2"}}, 422, "n"),
    ("/api/generate", {"json": {"class": 1, "seed": -4}}, 422, "seed"),
    ("/api/generate", {"content": b'{"class": 1, "cfg_scale": NaN}', "headers": {"content-type": "application/json"}},
     422, "cfg_scale"),
    ("/api/generate", {"json": {"class": 1, "cfg_scale": 0.5}}, 422, "cfg_scale"),
    ("/api/generate", {"json": {"class": 1, "temperature": -1}}, 422, "temperature"),
    ("/api/generate", {"json": {"class": 1, "top_p": 1.5}}, 422, "top_p"),
    ("/api/generate", {"json": {"class": 1, "top_k": -2}}, 422, "top_k"),
    ("/api/generate", {"json": {"class": 1, "cfg_schedule": "cosine"}}, 422, "cfg_schedule"),
    ("/api/generate", {"json": {"class": 1, "cfg_interval": [0.9, 0.1]}}, 422, "cfg_interval"),
    ("/api/generate", {"json": {"class": 1, "bogus": 1}}, 422, "bogus"),
    ("/api/generate/stream", {"json": {"class": 1, "n": 99}}, 422, "n"),
    ("/api/decode", {"json": {"codes": [[1, 2], [3, 4]]}}, 422, "codes"),
    ("/api/decode", {"json": {"codes": [64] * 16}}, 422, "codes"),
    ("/api/reconstruct", {"files": {"image": ("notes.txt", b"not an image at all", "text/plain")}}, 415, "image"),
    ("/api/encode", {"files": {"image": ("big.png", b"\x89PNG" + bytes(UPLOAD_LIMIT), "image/png")}}, 413, "image"),
    # Refused on its Content-Length, before the body is read:
    ("/api/reconstruct", {"files": {"image": ("huge.png", bytes(4 * 2 ** 20), "image/png")}}, 413, "image"),
    ("/api/encode", {"data": {"other": "x"}}, 422, "image"),
]


@pytest.mark.parametrize("route,kwargs,status,field", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(served, route, kwargs, status, field):
    client, _ = served
    response = client.post(route, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and body["error"].startswith(f"{field}: "), body
    assert client.post("/api/generate", json={"class": 1}).status_code == 200


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser():
    """Debian's headless chromium through selenium; skipped where it is absent, unless CI=true."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1300,900"):
        options.add_argument(flag)
    return options, DriverService(CHROMEDRIVER)


def test_the_page_generates_and_reconstructs_in_a_browser(served, job_samples, tmp_path):
    """One visit: generate class 0 at the job's seed (its samples 0 and 1 appear, pixel for pixel), then
    reconstruct an upload (the reconstruction and the 4 x 4 code grid the API gives)."""
    client, _ = served
    options, driver_service = browser()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    photo = (np.random.default_rng(1).random((24, 24, 3)) * 255).astype(np.uint8)
    (tmp_path / "photo.png").write_bytes(png_bytes(photo))
    driver = webdriver.Chrome(options=options, service=driver_service)
    try:
        driver.set_page_load_timeout(60)
        driver.get(str(client.base_url))
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "class")).options) == CLASSES)
        Select(driver.find_element(By.ID, "class")).select_by_value("0")
        for field, value in (("n", "2"), ("seed", "3")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "images").get_attribute("data-done") == "true")
        shown = driver.find_elements(By.CSS_SELECTOR, "#images img.sample")
        assert [img.get_property("naturalWidth") for img in shown] == [16, 16]
        images = np.stack([pixels(img.get_attribute("src")) for img in shown])
        assert images.std() > 10  # not blank
        np.testing.assert_array_equal(images, job_samples["arr_0"][:2])
        assert driver.find_element(By.ID, "progress").get_property("value") == 1

        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "photo.png"))
        driver.find_element(By.ID, "reconstruct").click()
        wait.until(lambda d: d.find_elements(By.ID, "recon-output"))
        api = client.post("/api/reconstruct", files={"image": ("photo.png", png_bytes(photo), "image/png")}).json()
        output = driver.find_element(By.ID, "recon-output")
        assert output.get_property("naturalWidth") == 16
        np.testing.assert_array_equal(pixels(output.get_attribute("src")), pixels(api["reconstruction"]))
        cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                 for tr in driver.find_elements(By.CSS_SELECTOR, "#codes tr")]
        assert cells == [[str(c) for c in row] for row in api["codes"]]
        assert driver.find_element(By.ID, "error").text == ""
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert Image.open(tmp_path / "page.png").size[0] > 0
    finally:
        driver.quit()
