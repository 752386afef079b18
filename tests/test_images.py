"""vitlab.images: every image mode decoded to the model's channels, the augmentation keyed by sample (not by worker or
position), the evaluation transform, MixUp and CutMix, the pinned hashes."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import N_TRAIN, epoch, fm, fmnist, folder  # noqa: F401 (fixtures)
from PIL import Image

from vitlab.common import DataError
from vitlab.images import (
    TrainAug,
    Transform,
    batch_mix,
    decode_image,
    eval_transform,
    in_val_split,
    resize,
    sample_hashes,
)


@pytest.mark.parametrize("crop_pad,pad", [(None, 4), (1, 1)], ids=["default", "crop_pad=1"])
def test_pad_crop_is_a_window_of_the_zero_padded_image(fmnist, crop_pad, pad):
    """Each image is a window of itself padded by `pad` px (by default 4 per 32 px of side, here 28 px: 4), maybe
    mirrored; the windows take every offset."""
    _, train_images, _ = fmnist
    train = fm(TrainAug(crop="pad", crop_pad=crop_pad)).train
    offsets, flips = set(), 0
    side = 2 * pad + 1
    for i in range(N_TRAIN):
        out, _ = train[i]
        padded = torch.nn.functional.pad(train_images[i], (pad,) * 4)
        crops = {(dy, dx): padded[:, dy:dy + 28, dx:dx + 28] for dy in range(side) for dx in range(side)}
        windows = [(dy, dx, f) for (dy, dx), crop in crops.items() for f in (False, True)
                   if torch.equal(out, crop.flip(-1) if f else crop)]
        assert windows, f"sample {i} is not a crop of its padded image"
        offsets.add(windows[0][:2])
        flips += windows[0][2]
    assert len(offsets) > min(10, side * side - 2) and 5 < flips < 35


def test_batched_and_single_sample_paths_agree(fmnist):
    train = fm(TrainAug()).train
    train.set_epoch(4, seed=9)
    batch = train.__getitems__([3, 17, 5])
    for k, i in enumerate([3, 17, 5]):
        assert torch.equal(batch[k][0], train[i][0])


@pytest.mark.parametrize("aug", [TrainAug(), TrainAug(crop="rrc", crop_scale=0.3, randaugment=(2, 9))],
                         ids=["pad-flip", "rrc-randaugment"])
def test_augmentation_does_not_depend_on_worker_count(fmnist, aug):
    train = fm(aug).train
    x0, y0 = epoch(train, seed=11, epoch=1, num_workers=0)
    x1, y1 = epoch(train, seed=11, epoch=1, num_workers=1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    unaugmented, _ = epoch(fm().train, seed=11, epoch=1)
    assert not torch.equal(x0, unaugmented)  # the augmentation did something


def test_randaugment_is_keyed_by_sample_not_by_position(fmnist):
    train = fm(TrainAug(crop="rrc", crop_scale=0.3, randaugment=(2, 9))).train
    train.set_epoch(0, seed=1)
    alone = train[6][0]
    assert torch.equal(train.__getitems__([2, 6])[1][0], alone)
    train.set_epoch(1, seed=1)
    assert not torch.equal(train[6][0], alone)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1
    return image


def rgba_image() -> Image.Image:
    image = Image.new("RGBA", (3, 1))
    for x, a in enumerate((255, 0, 128)):
        image.putpixel((x, 0), (200, 100, 50, a))
    return image


CASES = {  # name: (encoded image, expected first-row pixels for in_chans=3)
    "L": (lambda: encode(Image.new("L", (2, 1), 77), "PNG"), [(77, 77, 77)] * 2),
    "RGBA": (lambda: encode(rgba_image(), "PNG"), [(200, 100, 50), (0, 0, 0), (100, 50, 25)]),
    "LA": (lambda: encode(Image.new("LA", (1, 1), (90, 0)), "PNG"), [(0, 0, 0)]),
    "P": (lambda: encode(palette_image(False), "PNG"), [(10, 20, 30), (200, 100, 50)]),
    "P-transparent": (lambda: encode(palette_image(True), "PNG"), [(10, 20, 30), (0, 0, 0)]),
    "CMYK": (lambda: encode(Image.new("CMYK", (1, 1), (255, 0, 0, 0)), "TIFF"), [(0, 255, 255)]),
    "I;16": (lambda: encode(Image.fromarray(np.array([[0, 256, 0x1234, 65535]], np.uint16)), "PNG"),
             [(0, 0, 0), (1, 1, 1), (0x12, 0x12, 0x12), (255, 255, 255)]),
    "I": (lambda: encode(Image.fromarray(np.array([[0, 256, 0x1234, 65535]], np.int32)), "TIFF"),
          [(0, 0, 0), (1, 1, 1), (0x12, 0x12, 0x12), (255, 255, 255)]),
    "1": (lambda: encode(Image.new("1", (1, 1), 1), "PNG"), [(255, 255, 255)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_image_kinds_convert_to_the_model_channels(tmp_path, name):
    make, expected = CASES[name]
    path = tmp_path / "image.bin"
    path.write_bytes(make())
    rgb = decode_image(path, 3)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 1, len(expected))
    assert [tuple(p) for p in rgb[:, 0].T.tolist()] == expected
    gray = decode_image(path.read_bytes(), 1)
    luma = [(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16 for r, g, b in expected]
    assert gray.shape == (1, 1, len(expected)) and gray[0, 0].tolist() == luma


def test_jpeg_fast_path_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)), "JPEG")
    with Image.open(io.BytesIO(jpeg)) as image:
        rgb, gray = np.array(image.convert("RGB")), np.array(image.convert("L"))
    assert torch.equal(decode_image(jpeg, 3), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(decode_image(jpeg, 1)[0], torch.from_numpy(gray))
    cmyk = encode(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), "JPEG")  # libjpeg gives 4 channels: PIL converts
    assert decode_image(cmyk, 3).shape == (3, 2, 2)
    with pytest.raises(DataError, match="photo.jpg"):
        decode_image(jpeg[: len(jpeg) // 2], 3, name="photo.jpg")


def test_val_split_keys_are_pinned():
    # The hash that cuts a WebDataset val split must never change: a run resumed, or compared, with another
    # vitlab version would otherwise train on its own val samples. Pinned on CIFAR-style keys.
    keys = [f"train{i:05d}" for i in range(100)]
    assert [k for k in keys if in_val_split(k, 0.1)] == [
        "train00006", "train00014", "train00022", "train00024", "train00032",
        "train00054", "train00088", "train00093", "train00096"]
    assert sum(in_val_split(f"train{i:05d}", 0.1) for i in range(20000)) in range(1900, 2100)


def test_eval_transform_resizes_and_converts_channels():
    x = torch.full((3, 20, 10), 0, dtype=torch.uint8)
    x[0] = 255
    out = eval_transform((32, 32), 1)(x)
    assert out.shape == (1, 32, 32) and int(out[0, 0, 0]) == (255 * 19595 + 0x8000) >> 16
    same = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(eval_transform((32, 32), 3)(same), same)


def test_batch_mix_is_seeded_and_leaves_the_callers_rng_alone():
    assert batch_mix(0.0, 0.0, 10) is None
    mix = batch_mix(0.8, 1.0, 5)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    state = torch.get_rng_state()
    mixed, targets = mix(images, labels, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert mixed.shape == images.shape and targets.shape == (6, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and not torch.equal(mixed, images)
    again, again_targets = mix(images, labels, seed=3)
    assert torch.equal(again, mixed) and torch.equal(again_targets, targets)


def test_mixup_blends_images_and_targets_by_the_same_lambda():
    images, labels = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 3, 4])  # each label differs from its neighbour's
    for seed in range(4):
        mixed, targets = batch_mix(0.8, 0.0, 5)(images, labels, seed=seed)
        lam = targets[0, 0]  # the share of image 0's own label
        assert 0 < lam < 1
        partner = images.roll(1, 0)  # each image is mixed with the one before it (torchvision's MixUp)
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * partner)
        onehot = F.one_hot(labels, 5).float()
        torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0))


def test_cutmix_pastes_one_box_and_weighs_the_targets_by_its_area():
    images, labels = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4])
    partner = images.roll(1, 0)
    for seed in range(6):
        mixed, targets = batch_mix(0.0, 1.0, 5)(images, labels, seed=seed)
        pasted = (mixed != images).any(1)  # (B, H, W): pixels taken from the partner image
        assert torch.equal(mixed[:, :, pasted[0]], partner[:, :, pasted[0]]) if pasted[0].any() else True
        rows, cols = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
        if len(rows):  # one rectangle, the same for the whole batch
            box = torch.zeros_like(pasted[0])
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(pasted[0], box) and (pasted == box).all()
        lam = 1 - pasted[0].float().mean()  # the area left to each image's own label
        onehot = F.one_hot(labels, 5).float()
        torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0))


@pytest.mark.parametrize("aug", [TrainAug(crop="none", flip=False, trivialaugment=True),
                                 TrainAug(crop="none", flip=False, autoaugment="cifar10")],
                         ids=["trivialaugment", "autoaugment-cifar10"])
def test_augmentation_policies_change_images_keyed_by_sample(aug):
    transform = Transform((16, 16), 3, aug)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    hashes = sample_hashes(0, 0, range(64))
    out = transform(images, hashes)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert (out != images).flatten(1).any(1).float().mean() > 0.5  # most images changed
    assert torch.equal(transform(images[10:12], hashes[10:12]), out[10:12])  # the same draw for the same sample
    assert not torch.equal(transform(images, sample_hashes(0, 1, range(64))), out)  # another epoch, other draws
    with pytest.raises(DataError, match="choose one augmentation policy"):
        TrainAug(trivialaugment=True, randaugment=(2, 9))


def test_train_aug_validates():
    with pytest.raises(DataError, match="crop"):
        TrainAug(crop="center")
    with pytest.raises(DataError, match="crop pad must be >= 0, got -1"):
        TrainAug(crop_pad=-1)


@pytest.mark.parametrize("shape,size", [((1, 28, 28), (48, 48)), ((3, 40, 30), (32, 32)), ((5, 3, 17, 23), (224, 160)),
                                        ((2, 1, 300, 200), (28, 28)), ((3, 32, 32), (32, 32))])
def test_resize_is_torchvisions_without_importing_it(shape, size):
    """The evaluation resize equals torchvision's v2 resize (bilinear, antialiased) value for value, up and down,
    grey and RGB, single images and batches."""
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    ours = resize(x, size)
    assert ours.dtype == torch.uint8 and ours.shape == (*shape[:-2], *size)
    assert torch.equal(ours, TF.resize(x, list(size), antialias=True))


def test_evaluation_and_prediction_do_not_import_torchvision(tmp_path):
    """Preprocessing and predicting a PNG load neither torchvision nor torch._dynamo (3 s of the 6 s a one-image
    `vitlab predict` took); training augmentation and JPEG decoding import torchvision when they run."""
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "x.png")
    code = (
        "import sys, vitlab\n"
        "from vitlab.model import VisionTransformer, variant_config\n"
        "model = VisionTransformer(variant_config('vit-ti/4', image_size=16, in_chans=1, num_classes=2, hidden_size=32,"
        " num_layers=1, num_heads=2, mlp_dim=64))\n"
        f"print(vitlab.predict(model, {str(tmp_path / 'x.png')!r}, k=1))\n"
        "import vitlab.cli, vitlab.evaluate\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
