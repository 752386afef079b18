"""The largest logit difference between vitlab and timm on the same official-layout .npz, at real model sizes.

    python experiments/timm_parity.py

Then the hybrids (R50+ViT-B/16, R26+ViT-S/32) the same way, through timm's `vit_base_r50_s16_224` and
`vit_small_r26_s32_224`, and BiT-R50x1 against timm's `resnetv2_50x1_bit` with the same weights copied in. Their
GroupNorm scales and biases are drawn at random (the official initialisers would zero every unit's last one).
The hybrid's numerics differ from timm's by design: the official code standardises weights as
(w - mean) / (std + 1e-5) with GroupNorm eps 1e-6, timm as (w - mean) / sqrt(var + 1e-8) with eps 1e-5. The
table gives the difference with vitlab's official numerics and with timm's epsilons set in vitlab's model.

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
from vitlab.formats import export_npz
from vitlab.weights import load_model

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


def randomise_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


def hybrids() -> None:
    import timm
    from timm.models.vision_transformer import _load_weights

    from vitlab.resnet import ResNetV2, StdConv2d, bit_config

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    print()
    print("| model | image | max abs logit diff, official numerics | with timm's epsilons | logit scale (std) |")
    print("|---|---|---:|---:|---:|")
    for name, timm_name in (("R50+ViT-B/16", "vit_base_r50_s16_224"), ("R26+ViT-S/32", "vit_small_r26_s32_224")):
        cfg = variant_config(name, num_classes=1000, gelu="exact")
        source = VisionTransformer(cfg)
        torch.nn.init.normal_(source.head.weight, std=0.02)
        randomise_norms(source)
        path = export_npz(source, tmp / "hybrid.npz")
        ours = load_model(path, gelu="exact")
        reference = timm.create_model(timm_name, num_classes=1000).eval()
        _load_weights(reference, str(path))
        x = torch.randn(4, 3, 224, 224)
        with torch.no_grad():
            expected = reference(x)
            official = (ours(x) - expected).abs().max().item()
            for m in ours.modules():  # timm's epsilons
                if isinstance(m, StdConv2d):
                    m.eps, m.form = 1e-8, "var"
                elif isinstance(m, torch.nn.GroupNorm):
                    m.eps = 1e-5
            same = (ours(x) - expected).abs().max().item()
        print(f"| {name} | 224x224 | {official:.2e} | {same:.2e} | {expected.std().item():.3f} |", flush=True)

    ours = ResNetV2(bit_config("bit-r50x1", num_classes=1000)).eval()
    randomise_norms(ours)
    torch.nn.init.normal_(ours.head.weight, std=0.02)
    reference = timm.create_model("resnetv2_50x1_bit", num_classes=1000).eval()
    sd = {}
    for k, v in ours.state_dict().items():
        t = {"conv_root.weight": "stem.conv.weight", "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"}.get(k, k)
        t = t.replace(".units.", ".blocks.").replace("conv_proj", "downsample.conv")
        for i in "123":
            t = t.replace(f"gn{i}.", f"norm{i}.")
        sd[t] = v[:, :, None, None] if k == "head.weight" else v
    reference.load_state_dict(sd)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        diff = (ours(x) - expected).abs().max().item()
    print(f"| BiT-R50x1 (timm resnetv2_50x1_bit) | 224x224 | {diff:.2e} | (eps 1e-10 here, 1e-8 in timm) | "
          f"{expected.std().item():.3f} |")


if __name__ == "__main__":
    main()
    hybrids()
