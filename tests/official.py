"""Official vit_jax `.npz` checkpoints made in the tests, written key by key in the published layout.

The arrays are written here from the layout, not by vitlab's own exporter, so that the loader is checked against
the format rather than against itself.
"""

from __future__ import annotations

import numpy as np


def official_arrays(
    *,
    in_chans: int = 3,
    patch: tuple[int, int] = (4, 4),
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    mlp: int = 64,
    grid: tuple[int, int] = (4, 4),
    num_classes: int = 7,
    representation_size: int | None = None,
    classifier: str = "token",
    seed: int = 0,
    scale: float = 0.2,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    D, Dh = hidden, hidden // heads
    a: dict[str, np.ndarray] = {
        "embedding/kernel": r(patch[0], patch[1], in_chans, D),
        "embedding/bias": r(D),
        "Transformer/posembed_input/pos_embedding": r(1, grid[0] * grid[1] + (classifier == "token"), D),
        "Transformer/encoder_norm/scale": 1 + r(D),
        "Transformer/encoder_norm/bias": r(D),
    }
    if classifier == "token":
        a["cls"] = r(1, 1, D)
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            a[m + n + "/kernel"] = r(D, heads, Dh)
            a[m + n + "/bias"] = r(heads, Dh)
        a[m + "out/kernel"] = r(heads, Dh, D)
        a[m + "out/bias"] = r(D)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[b + ln + "/scale"] = 1 + r(D)
            a[b + ln + "/bias"] = r(D)
        a[b + "MlpBlock_3/Dense_0/kernel"] = r(D, mlp)
        a[b + "MlpBlock_3/Dense_0/bias"] = r(mlp)
        a[b + "MlpBlock_3/Dense_1/kernel"] = r(mlp, D)
        a[b + "MlpBlock_3/Dense_1/bias"] = r(D)
    width = D
    if representation_size:
        a["pre_logits/kernel"] = r(D, representation_size)
        a["pre_logits/bias"] = r(representation_size)
        width = representation_size
    if num_classes:
        a["head/kernel"] = r(width, num_classes)
        a["head/bias"] = r(num_classes)
    return a


def write_npz(path, arrays: dict[str, np.ndarray]):
    np.savez(path, **arrays)
    return path


def hybrid_arrays(*, num_layers: tuple[int, ...] = (1, 1), width: int = 32, patch: tuple[int, int] = (1, 1),
                  in_chans: int = 3, seed: int = 1, scale: float = 0.2, **vit) -> dict[str, np.ndarray]:
    """An official hybrid checkpoint (the layout of R50+ViT-B_16.npz): the ViT's arrays, its `embedding` reading
    the ResNet stem's feature map, and the stem's `conv_root`, `gn_root` and `blockI/unitJ/...` arrays."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    channels = width if not num_layers else 4 * width * 2 ** (len(num_layers) - 1)
    a = official_arrays(in_chans=channels, patch=patch, seed=seed + 1, scale=scale, **vit)
    a["conv_root/kernel"] = r(7, 7, in_chans, width)
    a["gn_root/scale"], a["gn_root/bias"] = 1 + r(width), r(width)
    cin = width
    for i, units in enumerate(num_layers):
        features = width * 2**i
        for j in range(units):
            p = f"block{i + 1}/unit{j + 1}/"
            shapes = {"conv1": (1, 1, cin, features), "conv2": (3, 3, features, features),
                      "conv3": (1, 1, features, 4 * features)}
            if j == 0:  # the first unit changes the width (and the stride after the first stage): a projection
                shapes["conv_proj"] = (1, 1, cin, 4 * features)
            for conv, shape in shapes.items():
                gn = conv.replace("conv", "gn")
                a[p + conv + "/kernel"] = r(*shape)
                a[p + gn + "/scale"], a[p + gn + "/bias"] = 1 + r(shape[-1]), r(shape[-1])
            cin = 4 * features
    return a
