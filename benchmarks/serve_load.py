"""`vitlab serve` under load: N concurrent clients against a running server, with dynamic batching on and off, and
one-image-at-a-time `vitlab.predict` in-process for comparison; then every kind of bad upload sent during a load.

    python benchmarks/serve_load.py                    # runs/demo if it exists, else the demo's model, random weights
    python benchmarks/serve_load.py runs/demo --clients 16 --requests 1000

Each mode starts `vitlab serve CKPT --port 0` in a subprocess on the loopback (`--max-batch 1` for batching off,
`--max-batch 32 --max-wait-ms 5` for on), warms it up, then `--clients` clients (asyncio tasks in this process, each a
keep-alive HTTP/1.1 connection written by hand so that the client costs little of the 2 cores the server also runs
on) post multipart PNGs (Fashion-MNIST test images when the Debian copy is there) back to back until `--requests`
answers have come or `--time-limit` seconds have passed. It prints requests/s, the median and 99th percentile of the
time from sending a request to its whole answer, and the mean batch the server ran (from /health). The in-process
row calls `vitlab.predict(predictor, image_bytes)` on one image at a time, decoding included, on the same model.

The bad-upload phase runs the load again against the batching server while every kind of bad upload (empty, not an
image, truncated PNG and JPEG, two decompression bombs, over the size limit, a form without the field "file") is
sent among it, as a multipart form and as a raw body; it checks each was answered with its 4xx, that every good
request was answered 200, that /health counted exactly those, and that the server still answers afterwards.
Nothing here is a test: timings vary with the machine; the ratios in one run are what compare.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
BOUNDARY = "vitlab-load-boundary"


def images(count: int) -> list[bytes]:
    """`count` PNGs: Fashion-MNIST test images when the Debian copy is there, else noise of the same size."""
    if FASHION_MNIST.exists():
        raw = gzip.decompress(FASHION_MNIST.read_bytes())
        pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    out = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def multipart(data: bytes, name: str = "image.png", field: str = "file") -> tuple[bytes, str]:
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def request(body: bytes, content_type: str, close: bool = False) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
            ).encode() + body


async def exchange(reader, writer, message: bytes) -> tuple[int, bytes]:
    """Send one request on a connection and read its whole answer: (status, body)."""
    writer.write(message)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def load(port: int, clients: int, total: int, time_limit: float, uploads: list[bytes]) -> dict:
    """`clients` keep-alive connections posting uploads back to back until `total` answers or `time_limit`."""
    messages = [request(*multipart(data)) for data in uploads]
    latencies, statuses, sent = [], [], 0
    stop = time.monotonic() + time_limit

    async def client(i: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < total and time.monotonic() < stop:
                sent += 1
                t0 = time.perf_counter()
                status, _ = await exchange(reader, writer, messages[sent % len(messages)])
                latencies.append(time.perf_counter() - t0)
                statuses.append(status)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    elapsed = time.perf_counter() - start
    return dict(requests=len(latencies), seconds=elapsed, rate=len(latencies) / elapsed, statuses=statuses,
                p50=1000 * percentile(latencies, 50), p99=1000 * percentile(latencies, 99))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def get_health(port: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    body = await reader.readexactly(length)
    writer.close()
    return json.loads(body)


class Server:
    """`vitlab serve CKPT --port 0 FLAGS` in a subprocess, for the duration of a `with`."""

    def __init__(self, ckpt: str, *flags: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", ckpt, "--port", "0", *flags],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+) ", line)
        if not found:
            self.process.kill()
            raise SystemExit(f"vitlab serve did not start: {line}{self.process.stderr.read()}")
        self.port = int(found.group(1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure_server(ckpt: str, flags: list[str], args, uploads: list[bytes]) -> dict:
    with Server(ckpt, *flags) as server:
        asyncio.run(load(server.port, args.clients, 4 * args.clients, 30, uploads))  # warm-up
        before = asyncio.run(get_health(server.port))
        result = asyncio.run(load(server.port, args.clients, args.requests, args.time_limit, uploads))
        after = asyncio.run(get_health(server.port))
    result["batch"] = (after["requests_served"] - before["requests_served"]) / max(1, after["batches"] - before["batches"])
    result["errors"] = sum(s != 200 for s in result["statuses"])
    return result


def measure_in_process(ckpt: str, args, uploads: list[bytes]) -> dict:
    """vitlab.predict on one image at a time (decoding included), the model loaded once as the server loads it."""
    import torch

    import vitlab
    from vitlab.runtime import Predictor
    from vitlab.serve import MODEL_THREADS

    torch.set_num_threads(MODEL_THREADS)  # as the server's model thread runs
    predictor = Predictor(vitlab.load_model(ckpt), "auto")
    for data in uploads[:20]:
        vitlab.predict(predictor, data)
    latencies, stop = [], time.monotonic() + args.time_limit
    start = time.perf_counter()
    while len(latencies) < args.requests and time.monotonic() < stop:
        t0 = time.perf_counter()
        vitlab.predict(predictor, uploads[len(latencies) % len(uploads)])
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return dict(requests=len(latencies), rate=len(latencies) / elapsed, p50=1000 * percentile(latencies, 50),
                p99=1000 * percentile(latencies, 99), batch=1.0, errors=0)


# --------------------------------------------------------------------------------------------------------------
# Bad uploads during a load
# --------------------------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height grey pixels with one scanline of data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_uploads(max_upload_mb: float) -> dict[str, tuple[bytes, int]]:
    """name: (bytes, the status the server must answer)."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    encoded = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        noise.save(buffer, fmt)
        encoded[fmt] = buffer.getvalue()
    return {
        "empty": (b"", 400),
        "not an image": (b"%PDF-1.4 " + b"x" * 500, 415),
        "truncated PNG": (encoded["PNG"][: len(encoded["PNG"]) // 2], 422),
        "truncated JPEG": (encoded["JPEG"][: len(encoded["JPEG"]) // 2], 422),
        "bomb 10000x10000 PNG": (png_header(10_000, 10_000), 413),
        "bomb 100000x100000 PNG": (png_header(100_000, 100_000), 413),
        f"over {max_upload_mb:g} MB": (b"\0" * int((max_upload_mb + 1) * 2**20), 413),
    }


async def send_bad(port: int, kinds: dict[str, tuple[bytes, int]]) -> list[tuple[str, str, int, int, str]]:
    """Each kind as a form and as a raw body, each on its own connection: (kind, how, expected, got, error)."""
    out = []
    cases = [(kind, how) for kind in kinds for how in ("multipart", "raw body")] + [("no field \"file\"", "multipart")]
    for kind, how in cases:
        await asyncio.sleep(0.05)  # spread among the load
        if kind.startswith("no field"):
            body, ctype, expected = *multipart(b"x", field="image"), 400
        else:
            data, expected = kinds[kind]
            body, ctype = multipart(data, f"{kind}.bin") if how == "multipart" else (data, "application/octet-stream")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, answer = await exchange(reader, writer, request(body, ctype, close=True))
        writer.close()
        out.append((kind, how, expected, status, json.loads(answer).get("error", "")))
    return out


def bad_uploads_during_load(ckpt: str, args, uploads: list[bytes]) -> None:
    kinds = bad_uploads(args.max_upload_mb)
    with Server(ckpt, "--max-batch", "32", "--max-wait-ms", "5", "--max-upload-mb", str(args.max_upload_mb)) as server:
        async def both():
            before = await get_health(server.port)
            result, bad = await asyncio.gather(load(server.port, args.clients, args.requests, args.time_limit, uploads),
                                               send_bad(server.port, kinds))
            after = await get_health(server.port)
            final = await load(server.port, 1, 1, 10, uploads)
            return before, result, bad, after, final

        before, result, bad, after, final = asyncio.run(both())
    print(f"\nEvery kind of bad upload, sent while {args.clients} clients load the batching server "
          f"(--max-upload-mb {args.max_upload_mb:g}):")
    print(f"{'upload':<24} {'as':<10} {'expected':>8} {'answered':>8}  error")
    for kind, how, expected, status, error in bad:
        print(f"{kind:<24} {how:<10} {expected:>8} {status:>8}  {error[:90]}")
    good = result["statuses"]
    served = after["requests_served"] - before["requests_served"]
    refused = after["requests_refused"] - before["requests_refused"]
    failed = after["requests_failed"] - before["requests_failed"]
    wrong = [row for row in bad if row[2] != row[3]]
    print(f"good requests during it: {len(good)} sent, {good.count(200)} answered 200 ({result['rate']:.0f} req/s, "
          f"p99 {result['p99']:.1f} ms); /health counted {served} served, {refused} refused, {failed} failed; "
          f"a request after it: {final['statuses']}")
    ok = not wrong and good.count(200) == len(good) == served and refused == len(bad) and not failed \
        and final["statuses"] == [200]
    print("all bad uploads answered with their 4xx, none lost, the server still serving" if ok else
          f"NOT AS EXPECTED: {wrong}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", nargs="?", default=None, help="default: runs/demo, else the demo's model, random")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="answers per mode")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per mode at most")
    parser.add_argument("--max-upload-mb", type=float, default=1.0, help="the bad-upload phase's limit")
    parser.add_argument("--no-bad-uploads", action="store_true", help="skip the bad-upload phase")
    args = parser.parse_args()
    uploads = images(64)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or (str(ROOT / "runs/demo") if (ROOT / "runs/demo/config.json").exists() else None)
        if ckpt is None:
            ckpt = random_demo_model(Path(tmp) / "demo")
        import vitlab
        from vitlab.runtime import default_device, resolve_precision

        cfg = vitlab.load_model(ckpt).cfg
        device = default_device()
        print(f"{ckpt}: {cfg.name}, {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.num_classes} classes, on {device} "
              f"in {resolve_precision('auto', device, inference=True)}; {args.clients} clients, up to {args.requests} "
              f"requests per mode (at most {args.time_limit:g} s), multipart PNGs of 28x28 images, loopback; "
              f"{os.cpu_count()} CPU cores shared by the server and the clients")
        rows = [("batching off (--max-batch 1)", measure_server(ckpt, ["--max-batch", "1"], args, uploads)),
                ("batching on (--max-batch 32, 5 ms)",
                 measure_server(ckpt, ["--max-batch", "32", "--max-wait-ms", "5"], args, uploads)),
                ("in-process predict, one at a time", measure_in_process(ckpt, args, uploads))]
        print(f"{'mode':<36} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'errors':>6}")
        for name, r in rows:
            print(f"{name:<36} {r['requests']:>8} {r['rate']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['batch']:>10.1f} {r['errors']:>6}")
        print(f"batching on / off: {rows[1][1]['rate'] / rows[0][1]['rate']:.2f}x the requests per second")
        if not args.no_bad_uploads:
            bad_uploads_during_load(ckpt, args, uploads)


def random_demo_model(out: Path) -> str:
    """The demo's model (vitlab.config.fashion_mnist_demo) with random weights and Fashion-MNIST's class names."""
    import torch

    from vitlab.config import PRESETS
    from vitlab.model import VisionTransformer
    from vitlab.weights import save_checkpoint

    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    cfg = PRESETS["fashion-mnist-demo"]().model_config(num_classes=10).replace(class_names=names)
    torch.manual_seed(0)
    return str(save_checkpoint(VisionTransformer(cfg), out))


if __name__ == "__main__":
    main()
