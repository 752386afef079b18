"""`vitlab serve` as people use it: a real uvicorn on a free loopback port in a thread, asked through httpx (and a raw
socket for a client that leaves mid-upload), the page in headless Chromium, and the command in a subprocess.

The model is tests/tiny.py's, trained for a few seconds on the tiny set, whose class k is a bright block at position
k of a 4x4 grid: so an image with block k must come back as class k, and every answer must equal what `vitlab.predict`
gives for the same image in this process. The server runs in float32 so that the two agree to rounding."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from tiny import TINY, fashion_dir, tiny_world, world  # noqa: F401 (fixtures)

import vitlab
from vitlab import cli, serve
from vitlab.config import TrainConfig
from vitlab.inspect import attention_statistics
from vitlab.train import train
from vitlab.weights import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fashion_dir):
    """The tiny model trained until it gets the tiny set's test images all right (8 epochs, a few seconds)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    with tiny_world(fashion_dir):
        assert train(TrainConfig(**TINY, epochs=8, out=str(out)))["top1"] == 1.0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@contextlib.contextmanager
def serving(model, **settings):
    """(URL, Service) of the model served by uvicorn on a free loopback port, in a thread, for the duration."""
    app = serve.create_app(model, source="tiny-run", **dict(dict(precision="fp32"), **settings))
    server, sock, url = serve.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield url, app.state.service
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(model):
    with serving(model, max_upload_mb=0.05) as (url, service):
        yield url, service


def block_image(k: int, size: int = 28, mode: str = "L") -> Image.Image:
    """A clean image of the tiny set's class k: the bright 7x7 block k of a 4x4 grid, at `size` pixels."""
    image = np.full((28, 28), 30, np.uint8)
    r, c = divmod(k, 4)
    image[r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] = 220
    return Image.fromarray(image).resize((size, size), Image.NEAREST).convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels, with one scanline of data: what a decompression
    bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post(url: str, data: bytes, query: str = "", name: str = "image.png", **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict{query}", files={"file": (name, data)}, timeout=30, **kw)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


# --------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------


def test_predict_answers_each_class_as_predict_does_in_process(server, model):
    url, _ = server
    names = model.cfg.class_names
    for k in range(10):
        data = encode(block_image(k))
        answer = post(url, data).json()["predictions"]
        assert answer[0]["index"] == k and answer[0]["label"] == names[k]
        expected = vitlab.predict(model, block_image(k), k=5, precision="fp32")
        assert [p["label"] for p in answer] == [name for name, _ in expected]
        assert [p["probability"] for p in answer] == pytest.approx([p for _, p in expected], abs=1e-5)
        assert all(names[p["index"]] == p["label"] for p in answer)
    # the raw image as the body is the same request
    raw = httpx.post(f"{url}/predict", content=encode(block_image(3)), timeout=30).json()
    assert raw == post(url, encode(block_image(3))).json()


def test_k_and_attention_in_the_query(server, model):
    url, _ = server
    data = encode(block_image(1))
    assert len(post(url, data, "?k=3").json()["predictions"]) == 3
    assert len(post(url, data, "?k=50").json()["predictions"]) == model.cfg.num_classes  # every class, no more
    assert "attention" not in post(url, data).json()
    for query, fragment in (("?k=0", "k must be"), ("?k=two", "k must be"), ("?attention=maybe", "attention must")):
        response = post(url, data, query)
        assert response.status_code == 400 and fragment in response.json()["error"], response.text


def test_attention_is_the_rollout_over_the_image_at_its_own_size(server, model):
    """A white image weighted by its rollout mask is the mask itself: 255 x the rollout of the patch grid,
    upsampled bilinearly to the image's 56x40 and scaled to its maximum, as `vitlab inspect` computes it."""
    url, _ = server
    white = Image.new("L", (56, 40), 255)
    answer = post(url, encode(white), "?attention=1").json()
    assert answer["attention"].startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["attention"].split(",", 1)[1])))
    assert overlay.size == (56, 40)
    x = vitlab.preprocess(model).uint8(white)[None]
    grid = attention_statistics(model, x)["rollout"][0]
    mask = F.interpolate(grid[None, None], size=(40, 56), mode="bilinear", align_corners=False)[0, 0]
    expected = (255 * mask / mask.max()).round()
    got = torch.from_numpy(np.asarray(overlay.convert("L"), dtype=np.float32))
    assert (got - expected).abs().max() <= 1
    assert got.max() == 255 and got.min() < 255  # not uniform: the mask shows something


def test_overlay_of_a_large_image_is_scaled_to_its_longer_side():
    grid = torch.rand(4, 4)
    image = torch.full((3, 100, 5000), 200, dtype=torch.uint8)
    png = Image.open(io.BytesIO(serve.overlay_png(image, grid)))
    assert png.size == (serve.OVERLAY_MAX_SIDE, 41) and png.mode == "RGB"


def test_health_names_the_model_and_counts(server, model):
    url, _ = server
    before = health(url)
    post(url, encode(block_image(2)))
    after = health(url)
    assert after["model"] == model.cfg.name and after["classes"] == list(model.cfg.class_names)
    assert after["image_size"] == [16, 16] and after["in_chans"] == 1 and after["attention"] is True
    assert after["device"] == "cpu" and after["precision"] == "fp32"
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["batches"] == before["batches"] + 1


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear 4xx each, the server still serving
# --------------------------------------------------------------------------------------------------------------

GOOD = encode(block_image(5))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
BAD_UPLOADS = {  # name: (the upload's bytes, the status, what the error must say)
    "empty": (b"", 400, "empty"),
    "not an image": (b"%PDF-1.4 not an image at all" * 10, 415, "not an image"),
    "truncated png": (encode(NOISE)[:len(encode(NOISE)) // 2], 422, "truncated"),
    "truncated jpeg": (encode(NOISE, "JPEG")[:len(encode(NOISE, "JPEG")) // 2], 422, "truncated"),
    # (PIL warns of the first bomb as it reads its header; the server then refuses it)
    "decompression bomb": (png_header(10_000, 10_000), 413, "decompression bomb"),
    "decompression bomb past PIL's own limit": (png_header(100_000, 100_000), 413, "decompression bomb"),
    "over the size limit": (GOOD + b"\0" * 60_000, 413, "over the upload limit of 0.05 MB"),
}


def send_bad(url: str, kind: str, raw: bool) -> httpx.Response:
    data, _, _ = BAD_UPLOADS[kind]
    if raw:
        return httpx.post(f"{url}/predict", content=data, timeout=30)
    return post(url, data, name=f"{kind}.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw body"])
@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_every_bad_upload_is_a_4xx_naming_what_is_wrong(server, kind, raw):
    url, _ = server
    before = health(url)
    response = send_bad(url, kind, raw)
    _, status, fragment = BAD_UPLOADS[kind]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment.lower() in error.lower() and "\n" not in error, error
    if not raw:
        assert error.startswith(f"{kind}.png"), error  # names the file
    after = health(url)
    assert after["requests_refused"] == before["requests_refused"] + 1 and after["batches"] == before["batches"]
    assert post(url, GOOD).status_code == 200


def test_malformed_forms_and_missing_fields(server):
    url, _ = server
    response = httpx.post(f"{url}/predict", files={"image": ("a.png", GOOD)}, timeout=30)
    assert response.status_code == 400 and 'no field "file" in the form (it has: image)' in response.json()["error"]
    response = httpx.post(f"{url}/predict", data={"file": "not a file"}, files={"x": ("a", b"")}, timeout=30)
    assert response.status_code == 400 and "holds text" in response.json()["error"]
    response = httpx.post(f"{url}/predict", content=b"--x\r\nnonsense", timeout=30,
                          headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400 and "malformed multipart" in response.json()["error"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_uploads_during_a_load_are_each_refused_and_no_request_is_lost(server):
    """Eight clients send good images while every kind of bad upload goes in among them."""
    url, _ = server
    before = health(url)
    statuses: dict[str, list[int]] = {"good": []}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            for _ in range(6):
                code = c.post(f"{url}/predict", files={"file": ("g.png", GOOD)}).status_code
                with lock:
                    statuses["good"].append(code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for kind in BAD_UPLOADS:
        statuses[kind] = [send_bad(url, kind, raw).status_code for raw in (False, True)]
    for t in threads:
        t.join()
    assert statuses.pop("good") == [200] * 48
    assert statuses == {kind: [status, status] for kind, (_, status, _) in BAD_UPLOADS.items()}
    after = health(url)
    assert after["requests_served"] - before["requests_served"] == 48
    assert after["requests_refused"] - before["requests_refused"] == 2 * len(BAD_UPLOADS)
    assert after["requests_failed"] == before["requests_failed"]


def test_a_client_that_leaves_mid_upload_costs_nothing(server):
    url, service = server
    before = health(url)
    decoded = []
    service.decode, decode = (lambda *a: decoded.append(a) or decode(*a)), service.decode
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 40000\r\n\r\n"
                      + GOOD[:1000])
        deadline = time.monotonic() + 10
        while health(url)["clients_disconnected"] == before["clients_disconnected"]:
            assert time.monotonic() < deadline, "the server never noticed the client had gone"
            time.sleep(0.02)
        assert post(url, GOOD).status_code == 200
    finally:
        service.decode = decode
    after = health(url)
    assert len(decoded) == 1  # only the good request after it
    assert after["batches"] == before["batches"] + 1 and after["requests_refused"] == before["requests_refused"]


def test_a_model_error_is_a_500_and_the_next_request_is_served(server):
    url, service = server
    logits = service.predictor.logits

    def broken(images):
        service.predictor.logits = logits  # fails once
        raise RuntimeError("out of memory (simulated)")

    service.predictor.logits = broken
    response = post(url, GOOD)
    assert response.status_code == 500
    assert response.json() == {"error": "server error while running the model: RuntimeError: out of memory (simulated)"}
    assert post(url, GOOD).status_code == 200
    assert health(url)["requests_failed"] >= 1


# --------------------------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------------------------


def test_requests_that_arrive_together_run_as_one_batch(model):
    """Eight clients at once: one batch of eight (it closes when full), each answer what predict gives for its own
    image; three more: one batch of three, closed by the wait; with --max-batch 1, one batch per request."""
    def together(url: str, ks: list[int]) -> list[dict]:
        barrier, answers = threading.Barrier(len(ks)), {}

        def client(k: int) -> None:
            data = encode(block_image(k))
            barrier.wait()
            answers[k] = post(url, data).json()["predictions"]

        threads = [threading.Thread(target=client, args=(k,)) for k in ks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [answers[k] for k in ks]

    with serving(model, max_batch=8, max_wait_ms=1500) as (url, _):
        answers = together(url, list(range(8)))
        assert health(url)["batch_sizes"] == {"8": 1}
        for k, answer in enumerate(answers):
            expected = vitlab.predict(model, block_image(k), precision="fp32")
            assert answer[0]["index"] == k
            assert [p["probability"] for p in answer] == pytest.approx([p for _, p in expected], abs=1e-5)
        together(url, [1, 2, 3])
        assert health(url)["batch_sizes"] == {"3": 1, "8": 1}
    with serving(model, max_batch=1, max_wait_ms=1500) as (url, _):
        together(url, list(range(8)))
        assert health(url)["batch_sizes"] == {"1": 8}


def test_the_batcher_closes_batches_when_full_or_after_the_wait():
    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def main():
        batcher = serve.Batcher(run, max_batch=2, max_wait=0.2)
        assert await asyncio.gather(*[batcher.submit(x) for x in "abcde"]) == list("ABCDE")
        start = time.monotonic()
        assert await batcher.submit("f") == "F"
        waited = time.monotonic() - start
        results = await asyncio.gather(batcher.submit("bad"), batcher.submit("g"), return_exceptions=True)
        assert [type(r) for r in results] == [ValueError, ValueError]  # the batch's error goes to all of it
        assert await batcher.submit("h") == "H"  # and the next batch runs
        return waited

    waited = asyncio.run(main())
    assert calls == [["a", "b"], ["c", "d"], ["e"], ["f"], ["bad", "g"], ["h"]]
    assert waited >= 0.2  # a lone request waits for company, as long as max_wait


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def test_the_page_is_one_file_that_fetches_nothing_from_elsewhere(server):
    url, _ = server
    response = httpx.get(url + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    outside = re.search(r"https?:|//[a-z]|@import|(?<![\w.])url\(", page, re.I)
    assert not outside, f"the page refers to something outside it: {outside}"
    assert '<meta name="viewport"' in page and '<label for="file">' in page and 'type="file"' in page


CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage")


@contextlib.contextmanager
def chromium(profile):
    """Debian's chromium driven through its chromium-driver (`apt-get install chromium chromium-driver`; .ci/run
    installs them): headless, as root, with background networking off (the closed network refuses it)."""
    for program in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(program).exists(), f"no {program}: apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_page_in_a_browser(model, tmp_path):
    """Chromium opens the page, an image goes in through the file input, the five classes and the overlay come
    out; the first Tab reaches the file input; at a phone's width nothing overflows. Screenshots in tmp_path."""
    image = tmp_path / "block7.png"
    block_image(7, size=112).save(image)
    with serving(model) as (url, _), chromium(tmp_path / "profile") as driver:
        wait = WebDriverWait(driver, 20)

        def state() -> str:
            return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")

        driver.get(url + "/")
        wait.until(lambda _: state() == "ready")
        assert model.cfg.name in driver.find_element(By.ID, "model").text
        assert "16×16" in driver.find_element(By.ID, "model").text
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert driver.switch_to.active_element.get_attribute("id") == "file"
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda _: state() in ("done", "error"))
        assert state() == "done", driver.find_element(By.ID, "status").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#predictions li")
        assert len(rows) == 5
        assert rows[0].find_element(By.CLASS_NAME, "label").text == model.cfg.class_names[7]
        wait.until(lambda _: driver.execute_script("return document.getElementById('overlay').naturalWidth") > 0)
        size = driver.execute_script("const o = document.getElementById('overlay'); return [o.naturalWidth, "
                                     "o.naturalHeight]")
        assert size == [112, 112]  # the overlay at the image's own size
        driver.save_screenshot(str(tmp_path / "page.png"))
        driver.set_window_size(390, 844)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        overlay_box = driver.find_element(By.ID, "overlay").rect
        assert overlay_box["width"] > 100  # the overlay still shown, beside or below the image
        driver.save_screenshot(str(tmp_path / "phone.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0 and Image.open(tmp_path / "phone.png").size[0] > 0


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def test_serve_flags_and_their_defaults():
    args = cli.build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.max_upload_mb, args.precision) == (
        "127.0.0.1", 8000, 32, 5.0, 20.0, "auto")  # loopback unless told otherwise


def test_serve_errors_are_one_line(checkpoint, tmp_path, capsys):
    def one_line_error(argv, fragment):
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err

    one_line_error(["serve", tmp_path / "missing"], "no such file")
    one_line_error(["serve", checkpoint, "--max-batch", "0"], "--max-batch must be >= 1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(["serve", checkpoint, "--port", taken.getsockname()[1]], "cannot listen on 127.0.0.1:")


@pytest.mark.slow
def test_vitlab_serve_as_a_user_runs_it(checkpoint, tmp_path):
    """`vitlab serve RUN --port 0` in a subprocess, then the README's `curl -F file=@shoe.png .../predict`, then
    Ctrl-C."""
    image = tmp_path / "shoe.png"
    block_image(9).save(image)
    process = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+) ", line)
        assert found, line + process.stderr.read()
        with open(image, "rb") as f:
            response = httpx.post(found.group(1) + "/predict", files={"file": ("shoe.png", f)}, timeout=30)
        assert response.status_code == 200
        answer = response.json()
        assert set(answer) == {"predictions"} and len(answer["predictions"]) == 5
        assert set(answer["predictions"][0]) == {"label", "index", "probability"}
        assert answer["predictions"][0]["index"] == 9
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
