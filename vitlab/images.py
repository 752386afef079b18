"""Images: decoding any file to uint8, the training augmentation and the evaluation transform, each sample's
randomness, and the bad-image policy.

Every image becomes a uint8 tensor (in_chans, H, W) at the model's resolution: uint8 is what crosses the
DataLoader worker boundary, and vitlab.runtime.normalize turns a batch into float32 inside the step.

Image modes (`decode_image`): grey, RGB, palette, CMYK, YCbCr and bilevel through PIL's conversions;
alpha (RGBA, LA, PA, palette or grey with a transparent colour) composited over black; 16-bit (I;16, I)
scaled by >> 8, so 65535 -> 255. RGB -> 1 channel is ITU-R 601-2 luma as PIL computes it.

Determinism. Resuming a run mid-epoch must reproduce the same batches bit for bit, so nothing draws from a
random state that depends on the process or the worker that happens to run it: the augmentation of a sample is
keyed by a 64-bit hash of (seed, epoch, sample id) (`sample_hashes`), where the sample id is its index in the
source (map-style sets) or a hash of its KEY (WebDataset). Pad-crop offsets and flips are read off the hash's
bits (which lets in-memory sets augment a whole batch in one vectorised op); RandomResizedCrop and RandAugment
run with torch's CPU generator seeded from the hash, under a save/restore in the main process so the caller's
RNG is untouched.

Bad images. An unreadable image raises DataError naming the file (folder) or shard and key (wds). With
bad_images="skip" it is logged and counted in the dataset's `skipped` (summed over DataLoader workers through
shared memory, `SkipCounter`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import platform
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import get_worker_info

from .common import DataError, one_line

# torchvision is imported where training augmentation or JPEG decoding needs it, not here: its import pulls in
# torchvision.models, then ops, then torch._dynamo (3 of the 6 s a one-image `vitlab predict` took), and
# evaluation (resize, channels) needs none of it.

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Transparent pixels are composited over this grey level: the colour stored under alpha 0 is arbitrary, so
# dropping alpha (PIL's convert("RGB")) would feed the model whatever the encoder left there.
ALPHA_BACKGROUND = 0

# -------------------------------------------------------------------------------------------- hashing
# splitmix64's finaliser (Steele, Lea & Flood 2014) on numpy uint64 arrays, which wrap on overflow by
# definition. Every sample's randomness is a pure function of (seed, epoch, sample id) through it.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SALT_ORDER, SALT_LOADER, SALT_SHARDS, SALT_BUFFER = 1, 2, 3, 4
_SALT_RRC, _SALT_RANDAUG = np.uint64(0xA5A5A5A5), np.uint64(0x5A5A5A5A00000000)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_hashes(seed: int, epoch: int, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """64-bit hashes of (seed, epoch, id) for each id: the only source of a sample's augmentation."""
    h = _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
    h = _mix64(h ^ (np.uint64(epoch & (2**64 - 1)) + _GOLDEN))
    return _mix64(h ^ (np.asarray(ids, dtype=np.uint64) + _GOLDEN))


def seed_int(seed: int, epoch: int, *salts: int) -> int:
    """A scalar seed for one use (epoch order, shard order, shuffle buffer) of (seed, epoch)."""
    h = sample_hashes(seed, epoch, [0])
    for s in salts:
        h = _mix64(h ^ (np.uint64(s) + _GOLDEN))
    return int(h[0] >> np.uint64(1))


def _key_hash(key: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=person).digest(), "little")


def key_id(key: str) -> int:
    """The sample id of a WebDataset KEY (its place in `sample_hashes`)."""
    return _key_hash(key, b"vitlab-id")


def in_val_split(key: str, fraction: float) -> bool:
    """Whether a WebDataset KEY falls in a val split of `fraction`: stable for any shard order or seed."""
    return _key_hash(key, b"vitlab-val") % 10000 < round(fraction * 10000)


def in_train_subset(keys: list[str], count: int) -> set[str]:
    """The `count` WebDataset KEYs of a training subset: those of smallest hash, so that a smaller subset lies
    inside every larger one (as the paper's nested JFT subsets), whatever the shard order."""
    return set(sorted(keys, key=lambda k: _key_hash(k, b"vitlab-subset"))[:count])




# ------------------------------------------------------------------------------------------- decoding

@functools.cache
def _jpeg_decoder():
    """torchvision's (decode_jpeg, ImageReadMode.UNCHANGED), or None where it has no image codecs (torchvision
    0.29 deprecates them in favour of TorchCodec; PIL decodes everything without them)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover
        return None
    return decode_jpeg, ImageReadMode.UNCHANGED


def decode_image(data: bytes | str | os.PathLike, in_chans: int, name: str | None = None) -> Tensor:
    """Decode an image file or byte string to uint8 (in_chans, H, W); DataError naming it if unreadable."""
    if not isinstance(data, bytes):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {name}: {exc.strerror or one_line(exc)}") from exc
    decoder = _jpeg_decoder() if data[:2] == b"\xff\xd8" else None
    if decoder is not None:
        # JPEG through torchvision's libjpeg-turbo: 26 us against PIL's 86 us for a 32x32 CIFAR image, and the
        # same pixels. Anything it cannot do (CMYK, errors) goes on to PIL, which names the error.
        decode_jpeg, unchanged = decoder
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=unchanged)
        except RuntimeError:
            x = None
        if x is not None and x.shape[0] in (1, 3):  # CMYK (4) goes through PIL's conversion
            return _match_channels(x, in_chans)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = pil_to_array(img, in_chans)
    except Image.UnidentifiedImageError as exc:
        raise DataError(f"cannot decode image {name or '<bytes>'}: not an image format PIL knows") from exc
    except Exception as exc:  # anything a decoder raises on bad bytes: OSError, SyntaxError, bomb, ...
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", one_line(exc))  # PIL names its buffer
        raise DataError(f"cannot decode image {name or '<bytes>'}: {reason}") from exc
    x = torch.from_numpy(array)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def pil_to_array(img: Image.Image, in_chans: int) -> np.ndarray:
    """(H, W) for in_chans 1, (H, W, 3) for 3, uint8, from any PIL mode."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit samples (PNG/TIFF open as I;16, older Pillow and 32-bit TIFF as I) keep their high byte:
        # 65535 -> 255, so the full range maps to 8 bits instead of saturating at 255.
        a = np.asarray(img)
        if mode == "F":  # float images are taken to be on the 0..255 scale
            gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return gray if in_chans == 1 else np.repeat(gray[..., None], 3, axis=-1)  # fresh, writable
    if "A" in img.getbands() or mode in ("RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # P/L/RGB with a transparent colour, LA, PA, RGBa
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, P, 1, HSV: PIL's conversions (pure cyan -> (0, 255, 255))
    return np.array(img.convert("L" if in_chans == 1 else "RGB"))


def _match_channels(x: Tensor, in_chans: int) -> Tensor:
    c = x.shape[-3]
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if c == 3 and in_chans == 1:  # PIL's convert("L"), ITU-R 601-2 luma in 16-bit fixed point
        r, g, b = x.to(torch.int32).unbind(-3)
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)
    raise DataError(f"cannot convert a {c}-channel image to {in_chans} channels")


# ----------------------------------------------------------------------------------------- transforms

AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")  # torchvision's AutoAugmentPolicy, in lower case


@dataclass
class TrainAug:
    """Per-sample training augmentation; mixup/cutmix are batch-level (`batch_mix`)."""
    crop: str = "auto"          # "rrc" | "pad" | "none" | "auto": "pad" for sources with side <= 64 px, else "rrc"
    crop_scale: float = 0.08    # RandomResizedCrop's lower area bound
    crop_pad: int | None = None  # pad-and-crop's padding in pixels per side (None: 4 per 32 px of side)
    flip: bool = True
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude)
    trivialaugment: bool = False  # TrivialAugmentWide (Müller and Hutter 2021)
    autoaugment: str | None = None  # an AutoAugment policy (Cubuk et al. 2019): "cifar10", "imagenet" or "svhn"
    pad_mode: str = "constant"  # "constant" (zeros, as in He et al. 2016 for CIFAR) | "reflect" | "replicate"

    def __post_init__(self):
        if self.crop not in ("auto", "rrc", "pad", "none"):
            raise DataError(f"unknown crop {self.crop!r}: expected auto, rrc, pad or none")
        if not 0 < self.crop_scale <= 1:
            raise DataError(f"crop scale must be in (0, 1], got {self.crop_scale}")
        if self.crop_pad is not None and self.crop_pad < 0:
            raise DataError(f"crop pad must be >= 0, got {self.crop_pad}")
        if self.pad_mode not in ("constant", "reflect", "replicate"):
            raise DataError(f"unknown pad mode {self.pad_mode!r}: expected constant, reflect or replicate")
        if self.randaugment is not None:
            if len(self.randaugment) != 2:
                raise DataError(f"randaugment takes (num_ops, magnitude), got {self.randaugment!r}")
            self.randaugment = (int(self.randaugment[0]), int(self.randaugment[1]))
        if self.autoaugment not in (None, *AUTOAUGMENT_POLICIES):
            raise DataError(f"unknown AutoAugment policy {self.autoaugment!r}: expected "
                            f"{', '.join(AUTOAUGMENT_POLICIES)}")
        chosen = [n for n in ("randaugment", "trivialaugment", "autoaugment") if getattr(self, n)]
        if len(chosen) > 1:
            raise DataError(f"choose one augmentation policy, not {' and '.join(chosen)}")

    def policy(self) -> Callable[[Tensor], Tensor] | None:
        """The torchvision op of the augmentation policy, applied to each image with its own seed; None."""
        from torchvision.transforms import v2

        if self.randaugment:
            return v2.RandAugment(*self.randaugment)
        if self.trivialaugment:
            return v2.TrivialAugmentWide()
        if self.autoaugment:
            return v2.AutoAugment(getattr(v2.AutoAugmentPolicy, self.autoaugment.upper()))
        return None


@contextlib.contextmanager
def _private_rng():
    """Leave the main process's CPU generator as it was; a DataLoader worker's may be reseeded freely."""
    if get_worker_info() is not None:
        yield
        return
    state = torch.default_generator.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


@contextlib.contextmanager
def one_thread():
    """Run torch ops on one intra-op thread: batches of small images gain nothing from more, and on a
    loaded machine OpenMP's hand-off makes a (256, 1, 28, 28) pad 100x slower (measured: 24 ms vs 0.1 ms)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Transform:
    """uint8 images (B, C, H, W) or (C, H, W) at source size -> uint8 at `image_size` with `in_chans`.

    With `aug` (training) it needs each sample's hash from `sample_hashes`; without it (evaluation) it only
    resizes and converts channels.
    """

    def __init__(self, image_size: tuple[int, int], in_chans: int, aug: TrainAug | None = None):
        self.image_size, self.in_chans, self.aug = tuple(image_size), in_chans, aug
        if aug is not None:
            from torchvision.transforms import v2

            self._rrc = v2.RandomResizedCrop(self.image_size, scale=(aug.crop_scale, 1.0), antialias=True)
            self._policy = aug.policy()

    def crop_mode(self, height: int, width: int) -> str:
        if self.aug is None:
            return "none"
        if self.aug.crop == "auto":
            return "pad" if max(height, width) <= 64 else "rrc"
        return self.aug.crop

    def __call__(self, x: Tensor, hashes: np.ndarray | None = None) -> Tensor:
        with one_thread():
            return self._apply(x, hashes)

    def _apply(self, x: Tensor, hashes: np.ndarray | None) -> Tensor:
        if x.ndim == 3:
            return self._apply(x[None], None if hashes is None else np.asarray(hashes).reshape(1))[0]
        if self.aug is not None:
            if hashes is None or len(hashes) != len(x):
                raise ValueError("a training transform needs one sample hash per image")
            hashes = np.asarray(hashes, dtype=np.uint64)
            flips = ((hashes >> np.uint64(32)) & np.uint64(1)).astype(bool) & self.aug.flip
            if self.crop_mode(*x.shape[-2:]) == "rrc":
                x = self._seeded(self._rrc, x, hashes ^ _SALT_RRC)
                x = torch.where(torch.from_numpy(flips)[:, None, None, None], x.flip(-1), x)
            else:
                x = self._pad_crop_flip(x, hashes, flips)
        x = self._resize(x)
        if self.aug is not None and self._policy is not None:  # RandAugment, TrivialAugment or AutoAugment
            x = self._seeded(self._policy, x, hashes ^ _SALT_RANDAUG)
        return _match_channels(x, self.in_chans)

    def many(self, images: list[Tensor], hashes: np.ndarray | None = None) -> list[Tensor]:
        """Transform images of mixed sizes: one batched call per size."""
        groups: dict[tuple, list[int]] = {}
        for k, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(k)
        out: list[Tensor] = [None] * len(images)
        for ks in groups.values():
            batch = self(torch.stack([images[k] for k in ks]), None if hashes is None else hashes[ks])
            for k, image in zip(ks, batch.unbind(0)):
                out[k] = image
        return out

    def _resize(self, x: Tensor) -> Tensor:
        return resize(x, self.image_size)

    def _pad_crop_flip(self, x: Tensor, hashes: np.ndarray, flips: np.ndarray) -> Tensor:
        """Pad (crop_pad px, by default 4 per 32 px of side), crop back to the source size, flip: vectorised over
        the batch."""
        b, _, h, w = x.shape
        pad_y, pad_x = (0, 0)
        if self.crop_mode(h, w) == "pad":
            pad_y, pad_x = (round(h / 8), round(w / 8)) if self.aug.crop_pad is None else (self.aug.crop_pad,) * 2
        off_y = torch.from_numpy(((hashes & np.uint64(0xFFFF)) % np.uint64(2 * pad_y + 1)).astype(np.int64))
        off_x = torch.from_numpy((((hashes >> np.uint64(16)) & np.uint64(0xFFFF))
                                  % np.uint64(2 * pad_x + 1)).astype(np.int64))
        if pad_y or pad_x:
            x = torch.nn.functional.pad(x, (pad_x, pad_x, pad_y, pad_y), mode=self.aug.pad_mode)
        rows = off_y[:, None] + torch.arange(h)                                      # (B, H)
        cols = off_x[:, None] + torch.arange(w)                                      # (B, W)
        cols = torch.where(torch.from_numpy(flips)[:, None], cols.flip(1), cols)
        out = x.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()                                  # (B, C, H, W)

    @staticmethod
    def _seeded(op: Callable[[Tensor], Tensor], x: Tensor, keys: np.ndarray) -> Tensor:
        seeds = _mix64(keys)
        with _private_rng():
            out = []
            for image, seed in zip(x, seeds):
                torch.default_generator.manual_seed(int(seed))
                out.append(op(image))
        return torch.stack(out)


def train_transform(aug: TrainAug, image_size: tuple[int, int], in_chans: int) -> Transform:
    """The training Transform: crop, flip, RandAugment, resize, channels; call it with sample hashes."""
    return Transform(image_size, in_chans, aug)


class Preprocess:
    """What a model needs of an image, from its config: `vitlab.preprocess(model)`. Called on one image (a path, a
    PIL image, a uint8 tensor (C, H, W) or a float tensor in [0, 1] as torchvision's to_tensor makes it), it returns
    the float tensor (C, H, W) the model takes: resized to its resolution as evaluation resizes, converted to its
    channels, normalised with its mean and std. `uint8(image)` stops before the normalisation."""

    def __init__(self, cfg):
        self.image_size, self.in_chans = tuple(cfg.image_size), cfg.in_chans
        self.mean, self.std = cfg.mean, cfg.std
        self.transform = Transform(self.image_size, self.in_chans, None)

    def uint8(self, image) -> Tensor:
        """uint8 (C, H, W) at the model's resolution and channels."""
        if isinstance(image, (str, os.PathLike, bytes)):
            x = decode_image(image, self.in_chans)
        elif isinstance(image, Image.Image):
            array = pil_to_array(image, self.in_chans)
            x = torch.from_numpy(array)
            x = x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
        elif isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise DataError(f"an image tensor is (C, H, W) with 1 or 3 channels, got {tuple(image.shape)}")
            if image.is_floating_point():  # torchvision's to_tensor: x / 255, so this is exact for such images
                image = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            elif image.dtype != torch.uint8:
                raise DataError(f"an integer image tensor must be uint8, got {image.dtype}")
            x = image.cpu()
        else:
            raise DataError(f"not an image: {type(image).__name__} (a path, a PIL image or a (C, H, W) tensor)")
        return self.transform(x)

    def __call__(self, image) -> Tensor:
        x = self.uint8(image).float() / 255
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std


def eval_transform(image_size: tuple[int, int], in_chans: int) -> Transform:
    """Resize to image_size (if different) and convert to in_chans; deterministic."""
    return Transform(image_size, in_chans, None)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 images (..., C, H, W) resized to `size`, bilinear with antialiasing: what torchvision's
    `v2.functional.resize(x, size, antialias=True)` computes on CPU (tests/test_images.py compares the two), without
    importing torchvision. Where PyTorch has a native uint8 kernel (AVX2, AVX-512, ARM) it runs on the uint8
    values; elsewhere in float32, rounded back."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size or x.numel() == 0:
        return x
    shape, (c, h, w) = x.shape, x.shape[-3:]
    y = x.reshape(-1, c, h, w)
    native = x.dtype == torch.uint8 and x.device.type == "cpu" and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64"))
    if native:
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(y.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        y = y.round_().to(x.dtype) if not x.is_floating_point() else y.to(x.dtype)
    return y.reshape(shape[:-3] + (c, *size))


def batch_mix(mixup: float, cutmix: float, num_classes: int) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """MixUp / CutMix (one of the two per batch when both are on) as mix(images, labels, seed=None).

    It runs on the float batch after `normalize` (MixUp blends pixel values) and returns (images,
    soft targets (B, num_classes)). Its draws come from torch's CPU generator; pass `seed` (e.g. a hash of
    the run seed and the step) to draw from a private generator so a resumed run mixes identically.
    None when both alphas are 0.
    """
    from torchvision.transforms import v2

    ops = []
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not ops:
        return None
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def mix(images: Tensor, labels: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        if seed is None:
            return op(images, labels)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return op(images, labels)

    return mix



# ----------------------------------------------------------------------------------------- bad images

class SkipCounter:
    """Counts skipped bad images across DataLoader workers: one shared-memory slot per worker."""

    def __init__(self):
        self._slots = torch.zeros(65, dtype=torch.int64).share_memory_()

    def add(self):
        info = get_worker_info()
        self._slots[0 if info is None else 1 + info.id % 64] += 1

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def skip_bad(dataset, exc: DataError) -> None:
    """An unreadable image: re-raised, or with bad_images="skip" counted in `dataset.skipped`, logged and dropped."""
    if dataset.bad_images != "skip":
        raise exc
    dataset._skips.add()
    log.warning("skipping %s", exc)
    return None
