"""`vitlab serve`: a classifier behind HTTP, with dynamic batching, and a page that shows where the ViT looked.

    POST /predict[?k=5][&attention=1]   an image, as the multipart field `file` or as the raw request body ->
        {"predictions": [{"label": ..., "index": ..., "probability": ...}, ...]}, the k most probable classes,
        most probable first; with attention=1 also "attention": "data:image/png;base64,...", the image weighted by
        its attention rollout (the paper's Fig. 6, as `vitlab inspect` draws it) at the image's own size
    GET /health   the model, its classes, the device and precision, the counts of requests and batches
    GET /         the page (vitlab/serve.html): one file that fetches nothing from elsewhere

Where the work happens. The event loop only moves bytes: it reads the body (counting it against the upload limit
as it arrives) and parses the form; decoding runs in a pool of threads; the model runs on a thread of its own, one
batch at a time (`Batcher`). Requests that arrive together run as one batch: a batch closes when it holds
`max_batch` images or when its first request has waited `max_wait` seconds, and the requests that queued while the
model ran the previous batch leave together at once. On a CPU a batch of 16 small images costs little more than
one (each op's fixed cost dominates), which is where the throughput comes from (benchmarks/serve_load.py).

Bad input is answered with a 4xx whose "error" names what was wrong, and nothing of it reaches the model:
    400  an empty upload, a form without the field "file", a malformed form, a bad query parameter
    413  a body over `max_upload_mb`; an image whose header declares more pixels than PIL's decompression-bomb
         limit (PIL only warns below twice that limit; here it is refused, before anything is decoded)
    415  bytes that are no image format PIL knows
    422  an image that cannot be decoded: truncated or corrupt
A client that disconnects mid-upload is dropped before anything is decoded. A model error answers the requests of
its batch with a 500 naming it, and the model thread goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from starlette.applications import Starlette
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from torch import Tensor, nn

from .common import DataError, UserError, one_line
from .evaluate import classes_of, preprocess
from .images import decode_image
from .inspect import attention_rollout, check_inspectable, rollout_to_grid
from .runtime import Predictor

log = logging.getLogger(__name__)

MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb threshold (about 89.5 megapixels)
OVERLAY_MAX_SIDE = 2048  # a larger image's overlay is scaled down to this longer side (a 12 MP photo: 20 MB of PNG)
MULTIPART_SLACK = 64 * 1024  # what a form adds around the file: boundaries, part headers, other small fields
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit, then the answer is sent
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
# The model thread's intra-op threads: half the cores, the rest left to the event loop and the decoders. OpenMP
# threads that wait at a barrier for a core another thread holds lose whole time slices: on this project's machine
# (2 cores, another process running) the demo model took 31 ms for a batch of 16 on one thread and 224 ms on two.
MODEL_THREADS = max(1, (os.cpu_count() or 1) // 2)


class BadUpload(Exception):
    """A request the client can fix: its HTTP status and the one line that says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------------------------


class Batcher:
    """`await submit(item)` -> `run(items)[i]`, with `run` called on batches of the items submitted together.

    A batch closes when it holds `max_batch` items or `max_wait` seconds after its first item arrived; `run` (one
    result per item, in order) runs on a thread of its own, one batch at a time, while the event loop goes on
    queueing. An exception from `run` is raised to every caller of that batch; the next batch runs as usual.
    `sizes` counts the batches by size."""

    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait: float, threads: int = MODEL_THREADS):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.sizes: collections.Counter[int] = collections.Counter()
        # (torch's intra-op thread count is OpenMP's, set per thread: this one's, not the process's)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vitlab-model", initializer=torch.set_num_threads,
                                          initargs=(threads,))
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first request (of this event loop) starts the batching task
            self._loop, self._pending, self._wake = loop, collections.deque(), asyncio.Event()
            self._task = loop.create_task(self._batches())
        future = loop.create_future()
        self._pending.append((time.monotonic(), item, future))
        self._wake.set()
        return await future

    async def _batches(self) -> None:
        loop, pending = asyncio.get_running_loop(), self._pending
        while True:
            while not pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = pending[0][0] + self.max_wait
            while len(pending) < self.max_batch and (timeout := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:  # (waiting on an event, not on a queue: a timeout can never lose an item)
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            batch = [pending.popleft() for _ in range(min(self.max_batch, len(pending)))]
            batch = [(item, future) for _, item, future in batch if not future.done()]  # not cancelled meanwhile
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self._thread, self.run, [item for item, _ in batch])
            except Exception as exc:  # the model's error goes to this batch's requests; the loop lives on
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


# --------------------------------------------------------------------------------------------------------------
# The model's side: one batch of images -> logits and, for the requests that ask, the rollout
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    image: Tensor  # uint8 (C, H, W) at the model's resolution
    attention: bool


def run_batch(predictor: Predictor, jobs: Sequence[Job]) -> list[tuple[Tensor, Tensor | None]]:
    """(logits (K,), rollout over the patch grid (h, w) or None) of each job. The jobs that ask for attention run
    in one call that writes out every layer's attention; the others in one fused call."""
    cfg = predictor.cfg
    images = torch.stack([job.image for job in jobs])  # (B, C, H, W) uint8
    out: list = [None] * len(jobs)
    plain = [i for i, job in enumerate(jobs) if not job.attention]
    looking = [i for i, job in enumerate(jobs) if job.attention]
    if plain:
        for i, logits in zip(plain, predictor.logits(images[plain])):
            out[i] = (logits, None)
    if looking:
        logits, maps = predictor(images[looking], return_attention=True)  # {layer: (B, heads, T, T)}
        rollout = attention_rollout([maps[layer].float() for layer in sorted(maps)])  # (B, T, T)
        grids = rollout_to_grid(rollout, cfg.grid_size, cfg.num_prefix_tokens)  # (B, h, w)
        for i, row, grid in zip(looking, logits.float(), grids):
            out[i] = (row, grid)
    return out


def overlay_png(image: Tensor, grid: Tensor) -> bytes:
    """The image (uint8 (C, H, W), at its own size) weighted by its rollout mask, bilinearly upsampled and scaled
    to its maximum, as `vitlab inspect` draws Fig. 6 (inspect.plot_rollout): PNG bytes. A longer side over
    OVERLAY_MAX_SIDE is scaled down to it first."""
    pil = Image.fromarray(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy())
    if max(pil.size) > OVERLAY_MAX_SIDE:
        pil.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32))  # (H, W) or (H, W, 3)
    mask = F.interpolate(grid[None, None].float(), size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    mask = (mask / mask.max().clamp_min(1e-12)).clamp(0, 1)
    shown = pixels * (mask if pixels.ndim == 2 else mask[..., None])
    buffer = io.BytesIO()
    Image.fromarray(shown.round().to(torch.uint8).numpy()).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# The request's side: the body, the image, the answer
# --------------------------------------------------------------------------------------------------------------


def check_pixels(data: bytes, name: str, limit: int = MAX_PIXELS) -> None:
    """BadUpload 413 when the image's header declares more than `limit` pixels: read before anything is decoded,
    since a few kilobytes of PNG can declare gigabytes of pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as e:  # over twice PIL's limit: PIL refuses to open it at all
        raise BadUpload(413, f"{name}: a decompression bomb: {e}") from None
    except Exception:  # not an image PIL can open: decode_image says why
        return
    if width * height > limit:
        raise BadUpload(413, f"{name}: a decompression bomb: {width}x{height} pixels ({width * height / 1e6:,.0f} "
                             f"megapixels) declared in {len(data):,} bytes, over the limit of {limit / 1e6:.0f} "
                             "megapixels")


async def read_upload(request: Request, limit_mb: float) -> tuple[bytes, str]:
    """The image's bytes and how to name it in errors: the multipart field `file`, or the raw body. The body is
    counted against the limit as it arrives; ClientDisconnect when the client leaves before the end."""
    limit = int(limit_mb * 2**20)
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    allowed = limit + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length", "")
    size_error = f"over the upload limit of {limit_mb:g} MB (--max-upload-mb)"
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * allowed:  # too large to be worth reading at all
        raise BadUpload(413, f"the upload is {int(declared) / 2**20:.1f} MB, {size_error}")
    body, total = bytearray(), 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= allowed:
            body += chunk
        elif total > DRAIN_FACTOR * allowed:  # stop reading: the connection closes after the answer
            break
    if total > allowed:  # the rest was read and dropped, so that a client still sending gets the answer
        raise BadUpload(413, f"the upload is {'over ' if total > DRAIN_FACTOR * allowed else ''}"
                             f"{total / 2**20:.1f} MB, {size_error}")
    if not multipart:
        return bytes(body), "the request body"

    async def once():
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=16,
                                     max_part_size=MULTIPART_SLACK).parse()
    except MultiPartException as e:
        raise BadUpload(400, f"a malformed multipart form: {e.message}") from None
    upload = form.get("file")
    if upload is None:
        raise BadUpload(400, f'no field "file" in the form (it has: {", ".join(form.keys()) or "nothing"}); send '
                             "the image as -F file=@IMAGE or as the raw request body")
    if isinstance(upload, str):
        raise BadUpload(400, 'the field "file" holds text, not a file (-F file=@IMAGE uploads one)')
    data, name = await upload.read(), upload.filename or "the upload"
    await form.close()
    if len(data) > limit:
        raise BadUpload(413, f"{name} is {len(data) / 2**20:.1f} MB, {size_error}")
    return data, name


def query_options(request: Request, num_classes: int) -> tuple[int, bool]:
    """(k, attention) from ?k=&attention=; BadUpload 400 naming a bad value."""
    text = request.query_params.get("k", "5")
    if not text.isdigit() or int(text) < 1:
        raise BadUpload(400, f"k must be a whole number >= 1, got {text!r}")
    attention = request.query_params.get("attention", "0").lower()
    if attention not in TRUE + FALSE:
        raise BadUpload(400, f"attention must be 1 or 0, got {attention!r}")
    return min(int(text), num_classes), attention in TRUE


class Service:
    """A checkpoint's model behind the routes: the predictor, the preprocessing, the batcher and the counts."""

    def __init__(self, model: nn.Module, *, source: str, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_upload_mb: float = 20.0, precision: str = "auto", device: torch.device | None = None,
                 decode_threads: int | None = None):
        self.predictor = Predictor(model, precision, device)
        self.cfg, self.prep, self.source = self.predictor.cfg, preprocess(model), source
        try:
            check_inspectable(self.predictor.model)
            self.attention = None
        except ValueError as e:  # a BiT ResNet: classes, but no attention to show
            self.attention = str(e)
        self.settings = dict(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb)
        self.batcher = Batcher(lambda jobs: run_batch(self.predictor, jobs), max_batch, max_wait_ms / 1000)
        self.decoders = ThreadPoolExecutor(decode_threads or min(4, os.cpu_count() or 1),
                                           thread_name_prefix="vitlab-decode")
        self.counts = collections.Counter(served=0, refused=0, failed=0, disconnected=0)

    def decode(self, data: bytes, name: str) -> tuple[Tensor, Tensor]:
        """The upload as uint8 (C, H, W) at its own size and at the model's resolution; BadUpload if unreadable."""
        if not data:
            raise BadUpload(400, f"{name} is empty: no image bytes were sent")
        check_pixels(data, name)
        try:
            original = decode_image(data, self.cfg.in_chans, name)
        except DataError as e:  # "cannot decode image NAME: reason"
            reason = str(e).removeprefix(f"cannot decode image {name}: ")
            if "not an image format" in reason:
                raise BadUpload(415, f"{name}: not an image ({reason})") from None
            raise BadUpload(422, f"{name}: a broken image, cannot decode it: {reason}") from None
        return original, self.prep.uint8(original)

    async def predict(self, request: Request) -> Response:
        loop, stage = asyncio.get_running_loop(), "reading the upload"
        try:
            k, attention = query_options(request, self.cfg.num_classes)
            if attention and self.attention:
                raise BadUpload(400, f"attention=1: {self.attention}")
            data, name = await read_upload(request, self.settings["max_upload_mb"])
            stage = "decoding the image"
            original, image = await loop.run_in_executor(self.decoders, self.decode, data, name)
            stage = "running the model"
            logits, grid = await self.batcher.submit(Job(image, attention))
            answer = {"predictions": [dict(label=label, index=i, probability=p)
                                      for i, label, p in classes_of(logits[None], self.cfg, k)[0]]}
            if attention:
                stage = "drawing the attention overlay"
                png = await loop.run_in_executor(self.decoders, overlay_png, original, grid)
                answer["attention"] = "data:image/png;base64," + base64.b64encode(png).decode()
        except ClientDisconnect:  # gone mid-upload: nothing was decoded, nobody reads an answer
            self.counts["disconnected"] += 1
            return Response(status_code=400)
        except BadUpload as e:
            self.counts["refused"] += 1
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Exception as e:  # the server's fault, not the client's; the traceback goes to the log
            log.exception("POST /predict failed while %s", stage)
            self.counts["failed"] += 1
            return JSONResponse({"error": f"server error while {stage}: {one_line(e)}"}, status_code=500)
        self.counts["served"] += 1
        return JSONResponse(answer)

    async def health(self, request: Request) -> Response:
        cfg, sizes = self.cfg, self.batcher.sizes
        names = list(cfg.class_names or (str(i) for i in range(cfg.num_classes)))
        return JSONResponse(dict(
            status="ok", model=cfg.name or Path(self.source).name, checkpoint=self.source, classes=names,
            num_classes=cfg.num_classes, image_size=list(cfg.image_size), in_chans=cfg.in_chans,
            attention=self.attention is None, device=str(self.predictor.device), precision=self.predictor.precision,
            **self.settings, requests_served=self.counts["served"], requests_refused=self.counts["refused"],
            requests_failed=self.counts["failed"], clients_disconnected=self.counts["disconnected"],
            batches=sum(sizes.values()), batch_sizes={str(n): sizes[n] for n in sorted(sizes)},
        ))

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)


PAGE = resources.files(__package__).joinpath("serve.html").read_text(encoding="utf-8")


def create_app(model: nn.Module, **settings) -> Starlette:
    """The ASGI app of a model (`Service`'s settings); `app.state.service` is the Service."""
    service = Service(model, **settings)
    app = Starlette(routes=[
        Route("/", service.page, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/predict", service.predict, methods=["POST"]),
    ])
    app.state.service = service
    return app


def make_server(app: Starlette, host: str = "127.0.0.1", port: int = 8000):
    """(a uvicorn Server for `app`, its socket, listening already so that a taken port is a UserError and the URL
    can be announced before the server runs, the URL); port 0 picks a free one."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from now on connections wait in the backlog until the server accepts them
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    return server, sock, f"http://{f'[{host}]' if ':' in host else host}:{port}"
