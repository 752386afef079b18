"""The `vitlab` command: parses arguments, calls the library, prints. User errors are one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .model import ConfigError


class UserError(Exception):
    """Any error the user can fix; printed as one line, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .weights import CheckpointError

    return (ConfigError, CheckpointError, DataError, UserError)


def _size(text: str) -> tuple[int, int]:
    """`224` or `224x320` (H x W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def cmd_models(args) -> None:
    from .model import model_table

    rows = model_table(args.image_size, args.num_classes, args.patch)
    h, w = args.image_size
    print(f"ViT variants at {h}x{w}, {args.num_classes} classes (GFLOPs: one image's forward pass, a multiply-add = 2 FLOPs)")
    print(f"{'name':<10} {'width':>6} {'depth':>6} {'heads':>6} {'mlp':>6} {'tokens':>7} {'params':>14} {'GFLOPs':>9}")
    for r in rows:
        print(
            f"{r['name']:<10} {r['hidden_size']:>6} {r['num_layers']:>6} {r['num_heads']:>6} {r['mlp_dim']:>6} "
            f"{r['tokens']:>7} {r['params']:>14,} {r['gflops']:>9.2f}"
        )
    from .model import forward_flops, model_config, num_params
    from .resnet import ResNetConfig

    print(f"\nThe paper's baselines and hybrids at {h}x{w} (`--model NAME`; a hybrid's number is its effective patch)")
    print(f"{'name':<14} {'ResNet stages':<16} {'tokens':>7} {'params':>14} {'GFLOPs':>9}")
    for name in ("bit-r26x1", "bit-r50x1", "r+vit-ti/16", "r26+vit-s/32", "r50+vit-b/16", "r50+vit-l/32"):
        try:
            cfg = model_config(name, image_size=args.image_size, num_classes=args.num_classes)
        except ConfigError:  # an image size the hybrid's stride does not divide
            continue
        hybrid = not isinstance(cfg, ResNetConfig)
        stages = cfg.resnet_num_layers if hybrid else cfg.num_layers
        tokens = cfg.num_patches + cfg.num_prefix_tokens if hybrid else "-"
        print(f"{cfg.name:<14} {str(tuple(stages)) if stages else 'root only':<16} {tokens:>7} {num_params(cfg):>14,} "
              f"{forward_flops(cfg) / 1e9:>9.2f}")


def cmd_convert(args) -> None:
    from .weights import head_is_zero, load_model, save_checkpoint

    model = load_model(args.src, image_size=args.image_size, num_classes=args.num_classes, gelu=args.gelu,
                       pos_embed_interp=args.pos_embed_interp, source_grid=args.source_grid, num_heads=args.num_heads)
    if head_is_zero(model) and args.num_classes is None:
        print(f"note: the head of {args.src} is all zero (as in the official ImageNet-21k checkpoints): every class "
              "scores the same until a head is fine-tuned (vitlab finetune)")
    out = save_checkpoint(model, args.out)
    cfg = model.cfg
    if not hasattr(cfg, "hidden_size"):  # a BiT ResNet (a vitlab checkpoint converted to itself)
        print(f"wrote {out}: {cfg.name or 'BiT ResNet'}, stages {cfg.num_layers}, width factor {cfg.width_factor}, "
              f"image {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.num_classes} classes")
        return
    stem = ""
    if cfg.resnet_num_layers is not None:
        stem = (f"a ResNet stem of stages {cfg.resnet_num_layers} and width factor {cfg.resnet_width_factor} "
                f"(stride {cfg.stem_stride}), ")
    print(
        f"wrote {out}: {stem}{cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads} heads, patch "
        f"{cfg.patch_size[0]}x{cfg.patch_size[1]}, image {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"{cfg.num_classes} classes, classifier {cfg.classifier}, representation_size {cfg.representation_size}, "
        f"gelu {cfg.gelu}, normalisation mean {cfg.mean} std {cfg.std}"
    )


def cmd_export(args) -> None:
    from .weights import export_npz, load_model

    path = export_npz(load_model(args.ckpt), args.out)
    print(f"wrote {path} (official vit_jax layout)")


# --------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer (Dosovitskiy et al., 2021).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the ViT variants, hybrids and BiT ResNets with their sizes and cost")
    p.add_argument("--image-size", type=_size, default=(224, 224), help="N or HxW (default 224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--patch", type=int, default=None, help="patch size for every row (default: 16, 14 for ViT-H)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert",
                       help="convert an official .npz, timm or Hugging Face weights into a vitlab checkpoint")
    p.add_argument("src", help="official vit_jax .npz file, a vitlab checkpoint directory, or a timm or Hugging Face "
                               "ViT in safetensors (a file, or the directory holding it and its config.json)")
    p.add_argument("out", help="output directory (config.json + model.safetensors)")
    p.add_argument("--image-size", type=_size, default=None, help="new resolution: position embeddings resized in 2-D")
    p.add_argument("--num-classes", type=int, default=None, help="a new zero-initialised head with this many classes")
    p.add_argument("--gelu", choices=("tanh", "exact"), default=None, help="GELU form (official weights: tanh)")
    p.add_argument("--pos-embed-interp", choices=("bilinear", "bicubic"), default="bilinear",
                   help="position-embedding resizing: bilinear as the official code (default), or bicubic as timm")
    p.add_argument("--source-grid", type=_size, default=None,
                   help="HxW patch grid of an .npz whose position embeddings are not a square grid")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads of timm or Hugging Face weights without a config.json (default: width / 64)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a checkpoint in the official vit_jax .npz layout")
    p.add_argument("ckpt", help="vitlab checkpoint directory or .npz")
    p.add_argument("out", help="output .npz file")
    p.set_defaults(func=cmd_export)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands that live beside their module (training, evaluation, inspection)."""
    return [importlib.import_module(f".{name}", __package__).register_cli for name in ("train", "evaluate", "inspect")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
