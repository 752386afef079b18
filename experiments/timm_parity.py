"""The largest logit difference between vitlab and timm on the same official-layout .npz, at real model sizes.

    python experiments/timm_parity.py

No download: each .npz is written from a ViT with the official initialisation (its zero head replaced by random
weights, so the logits are not trivially zero), then loaded twice: by timm's own npz loader
(`timm.models.vision_transformer._load_weights`) and by `vitlab.load_model(..., gelu="exact")` (timm uses the
exact GELU). Both run the same images in float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vitlab.model import variant_config, VisionTransformer
from vitlab.weights import export_npz, load_model

CASES = [  # (variant, image size (H, W), representation_size)
    ("ViT-B/16", (224, 224), None),
    ("ViT-B/32", (384, 384), None),
    ("ViT-S/16", (224, 320), None),
    ("ViT-Ti/16", (224, 224), 192),
]


def main() -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import _load_weights

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    print(f"| model | image | representation_size | max abs logit diff (fp32) | logit scale (std) |")
    print(f"|---|---|---|---:|---:|")
    for name, size, rep in CASES:
        cfg = variant_config(name, image_size=size, num_classes=1000, representation_size=rep, gelu="exact")
        source = VisionTransformer(cfg)
        torch.nn.init.normal_(source.head.weight, std=0.02)
        path = export_npz(source, tmp / f"{name.replace('/', '_')}.npz")
        grid = cfg.grid_size
        ours = load_model(path, gelu="exact", source_grid=grid)
        x = torch.randn(4, 3, *size)
        with torch.no_grad():
            logits = ours(x)
            if rep is None:
                reference = TimmViT(img_size=size, patch_size=cfg.patch_size, num_classes=1000, embed_dim=cfg.hidden_size,
                                    depth=cfg.num_layers, num_heads=cfg.num_heads).eval()
                _load_weights(reference, str(path))
                expected = reference(x)
            else:  # timm has no pre-logits layer: its features, then tanh(Dense) and the head by hand
                reference = TimmViT(img_size=size, patch_size=cfg.patch_size, num_classes=0, embed_dim=cfg.hidden_size,
                                    depth=cfg.num_layers, num_heads=cfg.num_heads).eval()
                _load_weights(reference, str(path))
                features = reference.forward_head(reference.forward_features(x), pre_logits=True)
                expected = ours.head(torch.tanh(ours.pre_logits.fc(features)))
        diff = (logits - expected).abs().max().item()
        print(f"| {name} | {size[0]}x{size[1]} | {rep} | {diff:.2e} | {expected.std().item():.3f} |", flush=True)


if __name__ == "__main__":
    main()
