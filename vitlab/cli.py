"""The `vitlab` command: every subcommand's parser, the `cmd_*` that run them, and what they print.

Library modules are imported inside each `cmd_*`, so that building the parser (and `vitlab --help`) imports neither
torch, torchvision nor matplotlib. User errors (vitlab.common.USER_ERRORS) are printed as one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import get_type_hints

from .common import USER_ERRORS, ConfigError, DataError, UserError, literal_choices, tune_allocator
from .config import FINE_TUNE, PRESETS, TrainConfig
from .specs import spec_help


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


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------------------
# Models and checkpoints: models, convert, export
# --------------------------------------------------------------------------------------------------------------


def cmd_models(args) -> None:
    from .common import atomic_write_text
    from .model import forward_flops, model_config, model_table, num_params
    from .resnet import ResNetConfig

    rows = model_table(args.image_size, args.num_classes, args.patch)
    h, w = args.image_size
    print(f"ViT variants at {h}x{w}, {args.num_classes} classes (GFLOPs: one image's forward pass, a multiply-add = 2 FLOPs)")
    print(f"{'name':<10} {'width':>6} {'depth':>6} {'heads':>6} {'mlp':>6} {'tokens':>7} {'params':>14} {'GFLOPs':>9}")
    for r in rows:
        print(
            f"{r['name']:<10} {r['hidden_size']:>6} {r['num_layers']:>6} {r['num_heads']:>6} {r['mlp_dim']:>6} "
            f"{r['tokens']:>7} {r['params']:>14,} {r['gflops']:>9.2f}"
        )
    others = []
    for name in ("bit-r26x1", "bit-r50x1", "r+vit-ti/16", "r26+vit-s/32", "r50+vit-b/16", "r50+vit-l/32"):
        try:
            cfg = model_config(name, image_size=args.image_size, num_classes=args.num_classes)
        except ConfigError:  # an image size the hybrid's stride does not divide, or too small for a ResNet
            continue
        hybrid = not isinstance(cfg, ResNetConfig)
        stages = cfg.resnet_num_layers if hybrid else cfg.num_layers
        others.append(dict(name=cfg.name, stages=list(stages), params=num_params(cfg), gflops=forward_flops(cfg) / 1e9,
                           tokens=cfg.num_patches + cfg.num_prefix_tokens if hybrid else None))
    if others:
        print(f"\nThe paper's baselines and hybrids at {h}x{w} (`--model NAME`; a hybrid's number is its effective patch)")
        print(f"{'name':<14} {'ResNet stages':<16} {'tokens':>7} {'params':>14} {'GFLOPs':>9}")
        for r in others:
            stages = str(tuple(r["stages"])) if r["stages"] else "root only"
            print(f"{r['name']:<14} {stages:<16} {r['tokens'] or '-':>7} {r['params']:>14,} {r['gflops']:>9.2f}")
    else:
        print(f"\n(no hybrid or BiT ResNet fits {h}x{w}: their strides are 16 to 32)")
    if args.json:
        atomic_write_text(args.json, json.dumps(dict(image_size=[h, w], vit=rows, others=others), indent=2) + "\n")


def cmd_convert(args) -> None:
    from .transfer import head_is_zero
    from .weights import load_model, save_checkpoint

    out = _out(args)
    overrides = dict(mean=args.mean, std=args.std, class_names=_class_names(args.class_names))
    model = load_model(args.src, image_size=args.image_size, num_classes=args.num_classes, gelu=args.gelu,
                       pos_embed_interp=args.pos_embed_interp, source_grid=args.source_grid,
                       num_heads=args.source_num_heads, **{k: v for k, v in overrides.items() if v is not None})
    if head_is_zero(model) and args.num_classes is None:
        print(f"note: the head of {args.src} is all zero (as in the official ImageNet-21k checkpoints): every class "
              "scores the same until a head is fine-tuned (vitlab finetune)")
    out = save_checkpoint(model, out)
    cfg = model.cfg
    if not hasattr(cfg, "hidden_size"):  # a BiT ResNet
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
        + ("" if cfg.class_names else "; no class names: predictions show class numbers (--class-names FILE)")
    )


def _class_names(path: Path | None) -> tuple[str, ...] | None:
    """Class names from a file: a JSON list, or one name per line."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--class-names {path}: cannot read it ({e.strerror})") from None
    try:
        names = json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"--class-names {path}: expected a JSON list of names or one name per line")
    return tuple(names)


def cmd_export(args) -> None:
    from .formats import export_npz, sidecar_path
    from .weights import load_model

    out = _out(args)
    model = load_model(args.ckpt)
    if out.suffix == ".onnx":
        from .onnx_export import OPSET, export_onnx

        path = export_onnx(model, out)
        print(f"wrote {path} (ONNX opset {OPSET}, float32 images (B, C, H, W) of any batch size in, logits out; the "
              "input normalisation, image size and class names in its metadata)")
        return
    path = export_npz(model, out)
    layout = "BiT's published layout" if not hasattr(model.cfg, "hidden_size") else "the official vit_jax layout"
    print(f"wrote {path} ({layout}) and {sidecar_path(path)} (image size, normalisation, class names, GELU form: "
          "what the layout has no place for; load_model and convert read it back)")


# --------------------------------------------------------------------------------------------------------------
# Training: train, finetune
# --------------------------------------------------------------------------------------------------------------


def cmd_train(args, defaults: tuple[str, dict] | None = None) -> None:
    import os

    from .config import make_config, read_config_file
    from .rundir import TRAIN_CONFIG_FILE
    from .train import TrainingStopped, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume:
        if args.config or getattr(args, "preset", None):
            raise ConfigError("--resume reads the run's own config: pass changes as flags, not --config or --preset")
        if overrides.get("out") not in (None, str(args.resume)):
            raise ConfigError(f"--out {overrides['out']} differs from --resume {args.resume}")
        saved = args.resume / TRAIN_CONFIG_FILE
        if not saved.is_file():
            raise UserError(f"{args.resume}: no {TRAIN_CONFIG_FILE}: not a training run to resume")
        layers = [(str(saved), read_config_file(saved)), ("command line", dict(overrides, out=str(args.resume)))]
    else:
        layers = [defaults] if defaults else []
        if getattr(args, "preset", None):
            if args.preset not in PRESETS:
                raise ConfigError(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
            preset = PRESETS[args.preset]()
            changed = {f.name: getattr(preset, f.name) for f in dataclasses.fields(TrainConfig)
                       if getattr(preset, f.name) != f.default}  # so that flags still resolve the defaults
            layers.append((f"preset {args.preset}", changed))
        if args.config:
            layers.append((str(args.config), read_config_file(args.config)))
        layers.append(("command line", overrides))
    cfg = make_config(*layers)
    try:
        results = train(cfg, resume=bool(args.resume))
        if args.json and int(os.environ.get("RANK", 0)) == 0:
            from .common import atomic_write_text

            record = dict(results, run=cfg.out, data=cfg.eval_data or cfg.data)
            atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    except TrainingStopped as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"vitlab {args.command}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def cmd_finetune(args) -> None:
    """`vitlab train` from pretrained weights, starting from the fine-tuning defaults (`FINE_TUNE`)."""
    if not args.resume and not getattr(args, "init", None):
        raise ConfigError("--init is required: the pretrained weights to fine-tune")
    cmd_train(args, defaults=("fine-tuning defaults", FINE_TUNE))


# --------------------------------------------------------------------------------------------------------------
# Evaluation: eval, fewshot, predict, inspect
# --------------------------------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    from . import data
    from .common import CheckpointError, atomic_write_text
    from .evaluate import Classification, read_real_labels
    from .rundir import run_setting
    from .runtime import Predictor, default_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = default_device()
    model = _classifier(args.ckpt, device)
    cfg = model.cfg
    dataset, split, class_names = data.build_eval(args.data, image_size=cfg.image_size, in_chans=cfg.in_chans,
                                                  split=args.split, val_split=args.val_split,
                                                  bad_images=args.bad_images)
    label_map = data.match_classes(class_names, cfg.class_names, args.data)
    if label_map is None and len(class_names) != cfg.num_classes:
        raise ConfigError(f"{args.data} has {len(class_names)} classes, the model in {args.ckpt} has "
                          f"{cfg.num_classes}")
    real = None
    if args.real_labels:
        if args.bad_images == "skip":
            raise ConfigError("--real-labels pairs labels with images by position: not with --bad-images skip")
        real = read_real_labels(args.real_labels, dataset, cfg.num_classes)
    tta = args.tta or run_setting(args.ckpt, "tta", "none")  # a run is evaluated as it evaluated itself
    if tta not in TTA_CHOICES:
        raise CheckpointError(f"{args.ckpt}: its train_config.json has tta {tta!r}, not {' or '.join(TTA_CHOICES)}")
    predictor = Predictor(model, args.precision, device, compile=args.compile)  # weights cast once
    evaluator = Classification(dataset, split, batch_size=args.batch_size, device=device,
                               precision=predictor.precision, num_workers=args.num_workers, real=real,
                               label_map=label_map, tta=tta)
    result = evaluator.run(predictor.run)
    if args.json:
        record = dict(result, split=split, data=args.data, checkpoint=str(args.ckpt), tta=tta)
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print(f"{split}: {result['n']} images" + (" and their mirror images (--tta flip)" if tta == "flip" else ""))
    print(f"loss: {result['loss']:.4f}")
    print(f"top1: {result['top1']:.4f}")
    print(f"top5: {result['top5']:.4f}")
    if real is not None:
        print(f"ReaL top1: {result['real_top1']:.4f} ({result['real_n']} images with ReaL labels)")


def _classifier(ckpt, device):
    """The checkpoint's model on `device`, refused if its head cannot classify (all zero)."""
    from .evaluate import check_classifier
    from .weights import load_model

    model = load_model(ckpt).to(device)
    check_classifier(model, ckpt)
    return model


def cmd_fewshot(args) -> None:
    from . import data
    from .common import atomic_write_text
    from .evaluate import FEWSHOT_L2_REG, fewshot
    from .runtime import Predictor, default_device
    from .weights import load_model

    args.l2_reg = FEWSHOT_L2_REG if args.l2_reg is None else args.l2_reg
    if args.seeds < 1 or args.batch_size < 1 or not args.l2_reg > 0:
        raise ConfigError("--seeds and --batch-size must be >= 1 and --l2-reg > 0")
    device = default_device()
    model = load_model(args.ckpt).to(device)
    cfg = model.cfg
    splits = data.build(args.data, image_size=cfg.image_size, in_chans=cfg.in_chans, train_transform=None,
                        val_split=args.val_split, split=args.split)
    eval_set, eval_name, eval_label_map = splits.eval, splits.eval_name, None
    if args.eval_data is not None:  # the evaluation images from another set of the same classes, matched by name
        eval_set, eval_name, names = data.build_eval(args.eval_data, image_size=cfg.image_size, in_chans=cfg.in_chans)
        eval_label_map = data.match_classes(names, splits.class_names, args.eval_data)
        if eval_label_map is None and len(names) != splits.num_classes:
            raise data.DataError(f"{args.eval_data} has {len(names)} classes, {args.data} {splits.num_classes}")
    if eval_set is None:
        raise data.DataError(f"{args.data} has no val or test split; pass --val-split FRACTION or --eval-data SPEC")
    shots = sorted(set(args.shots))
    predictor = Predictor(model, args.precision, device)
    result = fewshot(predictor.model, splits.train, eval_set, splits.num_classes, shots=shots, seeds=range(args.seeds),
                     l2_reg=args.l2_reg, batch_size=args.batch_size,
                     precision=predictor.precision, num_workers=args.num_workers, eval_label_map=eval_label_map)
    kind = "pre-logits" if cfg.representation_size else "[class] token" if cfg.classifier == "token" else "mean-pooled"
    print(f"{args.ckpt}: {cfg.name or 'ViT'}, {result['feature_dim']}-dim {kind} features; {args.data}: "
          f"{splits.num_classes} classes, {result['featurised']} of {result['train_images']} training images "
          f"featurised, {eval_name} {result['eval_images']} images; l2 reg {args.l2_reg:g}, "
          f"{args.seeds} seed{'s' if args.seeds > 1 else ''}")
    print(f"{'shots':>5}  {'accuracy':>8}  {'std':>6}")
    for k, r in result["results"].items():
        print(f"{k:>5}  {r['mean']:>8.4f}  {r['std']:>6.4f}")
    if args.json:
        record = dict(result, results={str(k): v for k, v in result["results"].items()}, data=args.data,
                      split=eval_name, eval_data=args.eval_data, checkpoint=str(args.ckpt),
                      num_classes=splits.num_classes)
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")


def cmd_predict(args) -> int:
    import torch

    from .common import atomic_write_text
    from .evaluate import preprocess, top_classes
    from .runtime import Predictor, default_device

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    paths = _image_paths(args.images)
    device = default_device()
    model = _classifier(args.ckpt, device)
    predictor, prep = Predictor(model, args.precision, device), preprocess(model)
    records, good, images = [], [], []
    for path in paths:  # each file on its own: one that cannot be read costs only its own line
        try:
            images.append(prep.uint8(path))
        except DataError as e:
            print(f"vitlab predict: error: {e}", file=sys.stderr)
            records.append(dict(file=path, error=str(e)))
            continue
        records.append(dict(file=path))
        good.append(records[-1])
    tops = top_classes(predictor, torch.stack(images), args.top_k) if images else []
    for record, top in zip(good, tops):
        record["predictions"] = [dict(label=name, index=i, probability=p) for i, name, p in top]
        print(record["file"])
        width = max(len(name) for _, name, _ in top)
        for _, name, p in top:
            print(f"  {name:<{width}}  {p:.4f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    failed = len(records) - len(good)
    if failed:
        print(f"vitlab predict: {failed} of {len(records)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _image_paths(items: list[str]) -> list[str]:
    """Files as given; directories as the image files in them (sorted, not recursive); glob patterns expanded."""
    import glob

    from .images import IMAGE_EXTENSIONS

    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"{item}: a directory without image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(glob.glob(item))
            if not found:
                raise UserError(f"{item}: no file matches")
            paths += found
        else:
            paths.append(item)
    return paths


def cmd_inspect(args) -> None:
    import shutil

    import torch

    from .inspect import ARRAYS_FILE, JSON_FILE, PAGE_FILE, TITLES, check_inspectable, data_images, image_files, run
    from .weights import load_model

    for flag in ("num_images", "num_components", "num_overlays", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    if args.images and args.image_flag:
        raise UserError("give the images as arguments or after --images, not both")
    paths = args.images or args.image_flag
    if paths and args.data:
        raise UserError("take images from files or from --data, not both")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.ckpt, image_size=args.image_size, source_grid=args.source_grid,
                       num_heads=args.source_num_heads).to(device)
    try:
        check_inspectable(model)
    except ValueError as e:
        raise UserError(f"{args.ckpt}: {e}") from None
    cfg = model.cfg
    images = names = labels = None
    image_source = None
    if paths:
        images = image_files(_image_paths(paths), cfg)
        names = [Path(path).name for path in _image_paths(paths)]
        image_source = f"{len(names)} image files"
    elif args.data:
        images, names, labels, image_source = data_images(args.data, cfg, args.split, args.num_images)
    report = run(model, images, args.out, names=names, labels=labels, source=str(args.ckpt),
                 image_source=image_source, num_components=args.num_components, num_overlays=args.num_overlays,
                 batch_size=args.batch_size)
    for key, name in report["figures"].items():
        print(f"wrote {args.out / name}")
    for key, reason in report["skipped"].items():
        print(f"skipped {TITLES[key][3:].lower()}: {reason}")
    if "mean_attention_distance" in report:
        per_layer = ", ".join(f"{sum(d) / len(d):.1f}" for d in report["mean_attention_distance"])
        print(f"mean attention distance per layer (pixels, mean over heads): {per_layer}")
    print(f"wrote {args.out / JSON_FILE}, {args.out / ARRAYS_FILE}")
    if args.json:
        shutil.copyfile(args.out / JSON_FILE, args.json)
    print(f"open {args.out / PAGE_FILE}")


def cmd_serve(args) -> None:
    from .runtime import default_device

    try:
        from .serve import create_app, make_server
    except ImportError as e:  # the optional extra is not installed
        raise UserError(f"serving needs the serve extra: pip install 'vitlab[serve]' ({e})") from None
    if args.max_batch < 1 or args.max_wait_ms < 0 or not args.max_upload_mb > 0 or not 0 <= args.port <= 65535:
        raise UserError(f"--max-batch must be >= 1, --max-wait-ms >= 0, --max-upload-mb > 0 and --port 0-65535; got "
                        f"{args.max_batch}, {args.max_wait_ms}, {args.max_upload_mb} and {args.port}")
    device = default_device()
    app = create_app(_classifier(args.ckpt, device), source=str(args.ckpt), max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb, precision=args.precision)
    server, sock, url = make_server(app, args.host, args.port)
    service = app.state.service
    cfg = service.cfg
    print(f"vitlab serve: {args.ckpt} ({cfg.name or 'model'}, {cfg.image_size[0]}x{cfg.image_size[1]}, "
          f"{cfg.num_classes} classes, {service.predictor.device} {service.predictor.precision}) at {url} "
          f"(batches of up to {args.max_batch}, waiting up to {args.max_wait_ms:g} ms); Ctrl-C stops it", flush=True)
    server.run(sockets=[sock])


# --------------------------------------------------------------------------------------------------------------
# The parser. One convention for every command: the inputs positional, the output --out (the positional OUT of
# convert and export kept as an alias), --json wherever a command measures or predicts, every default in --help.
# --------------------------------------------------------------------------------------------------------------


class _Help(argparse.HelpFormatter):
    """Shows each option's default unless its help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []) and (
                "default" not in text):
            shown = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            text += f" (default: {shown})"
        return text


CHECKPOINT_HELP = ("a vitlab checkpoint or run directory, an official .npz (ViT, hybrid or BiT), timm or Hugging Face "
                   "safetensors (a file, or the directory holding it and its config.json), or hf-hub:ORG/NAME")
PRECISION_HELP = "auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32"
TTA_CHOICES = literal_choices(get_type_hints(TrainConfig)["tta"])  # what a run may have evaluated with


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer (Dosovitskiy et al., 2021).",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)  # noqa: E731

    p = command("models", help="list the ViT variants, hybrids and BiT ResNets with their sizes and cost")
    p.add_argument("--image-size", type=_size, default=(224, 224), help="N or HxW")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    p.add_argument("--patch", type=int, default=None, help="patch size for every row (default: 16, 14 for ViT-H)")
    p.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    p.set_defaults(func=cmd_models)

    p = command("convert", help="convert official .npz, timm or Hugging Face weights (or hf-hub:ORG/NAME) into a "
                                "vitlab checkpoint")
    p.add_argument("src", help=CHECKPOINT_HELP)
    _add_out(p, "output directory (config.json + model.safetensors)")
    p.add_argument("--image-size", type=_size, default=None, help="new resolution: position embeddings resized in 2-D")
    p.add_argument("--num-classes", type=int, default=None, help="a new zero-initialised head with this many classes")
    p.add_argument("--gelu", choices=("tanh", "exact"), default=None, help="GELU form (official weights: tanh)")
    p.add_argument("--mean", type=_float_list, default=None,
                   help="the input normalisation's mean per channel, for a file that does not record it (0.5: [-1, 1])")
    p.add_argument("--std", type=_float_list, default=None, help="its std per channel")
    p.add_argument("--class-names", type=Path, default=None, metavar="FILE",
                   help="the class names, one per line or a JSON list, for a file that does not record them")
    p.add_argument("--pos-embed-interp", choices=("bilinear", "bicubic"), default="bilinear",
                   help="position-embedding resizing: bilinear as the official code, or bicubic as timm")
    _add_source_hints(p)
    p.set_defaults(func=cmd_convert)

    p = command("export", help="write a checkpoint as the official files are (.npz, and NAME.npz.json beside it) or "
                               "as an ONNX graph (.onnx)")
    p.add_argument("ckpt", help=CHECKPOINT_HELP)
    _add_out(p, "output file: NAME.npz (vit_jax's layout, BiT's for a BiT ResNet) or NAME.onnx")
    p.set_defaults(func=cmd_export)

    _add_training(command)
    _add_evaluation(command)
    return parser


def _add_out(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("out_positional", nargs="?", type=Path, default=None, metavar="OUT", help="the same as --out")
    p.add_argument("--out", type=Path, default=None, help=help)


def _out(args) -> Path:
    """--out, or the positional OUT of convert and export."""
    if args.out and args.out_positional and args.out != args.out_positional:
        raise UserError(f"two outputs: {args.out_positional} and --out {args.out}")
    out = args.out or args.out_positional
    if out is None:
        raise UserError("--out is required")
    return out


def _add_source_hints(p: argparse.ArgumentParser) -> None:
    """What a checkpoint file may not say about itself, for the commands that load one."""
    p.add_argument("--source-grid", type=_size, default=None,
                   help="HxW patch grid of an .npz whose position embeddings are not a square grid")
    p.add_argument("--source-num-heads", type=int, default=None,
                   help="heads of timm or Hugging Face weights without a config.json (default: width / 64)")


def _add_training(command) -> None:
    """`vitlab train` and `vitlab finetune`: one flag per TrainConfig field, plus --config and --resume (and
    --preset for train), each with the default of its command."""
    p = command("train", help="train a ViT (from scratch, or continue a run with --resume)",
                description="Train a ViT. Settings come from the defaults, then --preset, then --config FILE.yaml, "
                            "then flags.")
    p.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)}")
    _add_run_flags(p, {})
    p.set_defaults(func=cmd_train)

    defaults = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in FINE_TUNE.items())
    p = command("finetune", help="fine-tune pretrained weights (--init) on new data at a new resolution",
                description="Fine-tune as the paper does (appendix B.1.1): the weights of --init with a new zero head, "
                            "the pre-logits layer dropped, the position embeddings interpolated to --image-size; the "
                            f"training loop of `vitlab train` with other defaults ({defaults}), then --config "
                            "FILE.yaml, then flags.")
    _add_run_flags(p, FINE_TUNE)
    p.set_defaults(func=cmd_finetune)


def _add_run_flags(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--config", type=Path, default=None, help="a YAML file of TrainConfig fields")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    p.add_argument("--json", type=Path, default=None, help="also write the last evaluation to this JSON file")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "")
        default = defaults.get(f.name, f.default)
        pair = {"epochs": "steps", "steps": "epochs"}.get(f.name)  # two ways of saying how long: one default
        if (f.name in defaults or pair in defaults) and "default" in help:  # the field's default is not this command's
            help = help.split(" (default")[0].split("; default")[0]
        if default is not None and "default" not in help and "required" not in help:
            help += f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        if hints[f.name] is bool or hints[f.name] == bool | None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:  # parsed against the field's type by TrainConfig itself, so that errors name the field
            choices = literal_choices(hints[f.name])
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help)


def _add_evaluation(command) -> None:
    """`vitlab eval`, `vitlab fewshot`, `vitlab predict`, `vitlab inspect` and `vitlab serve`."""
    p = command("eval", help="top-1 / top-5 accuracy of a checkpoint on a labelled set",
                description="Top-1 and top-5 accuracy on a data spec's val or test split, or on all of a set that has "
                            "neither (WebDataset shards, a folder of class folders).")
    p.add_argument("ckpt", help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help=spec_help("the data to evaluate on"))
    p.add_argument("--split", choices=("test", "val"), default=None, help="default: val if there is one, else test")
    p.add_argument("--val-split", type=float, default=None,
                   help="the fraction of the training data cut as val (as in training)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: 1.15-1.5x the images/s (benchmarks/step_speed.py) after 30-60 s of "
                        "compiling, for large sets")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--bad-images", choices=("error", "skip"), default="error",
                   help="an unreadable image stops the evaluation, or is skipped and counted")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=PRECISION_HELP)
    p.add_argument("--tta", choices=TTA_CHOICES, default=None,
                   help="test-time augmentation: flip averages each image's class probabilities with its mirror "
                        "image's (default: a training run's own, else none)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--real-labels", type=Path, default=None, metavar="REAL_JSON",
                   help="also report ImageNet-ReaL top-1: real.json, one list of labels per validation image in "
                        "sorted file-name order (images with none are left out)")
    p.set_defaults(func=cmd_eval)

    p = command("fewshot", help="linear few-shot accuracy of frozen features (closed-form ridge)",
                description="The paper's few-shot evaluation: k images per class (drawn per seed), their frozen "
                            "features mapped to {-1,1}^K by L2-regularised least squares, accuracy on the held-out "
                            "split; mean and std over seeds.")
    p.add_argument("ckpt", help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help=spec_help("the data to evaluate on"))
    p.add_argument("--shots", type=_int_list, default=[1, 5, 10, 25], help="images per class")
    p.add_argument("--seeds", type=int, default=5, help="draws of the shots, seeds 0..N-1")
    p.add_argument("--l2-reg", type=float, default=None, help="the ridge regulariser (default 1024, big_vision's)")
    p.add_argument("--split", choices=("test", "val"), default=None, help="default: val if there is one, else test")
    p.add_argument("--val-split", type=float, default=None, help="evaluate on this fraction cut from the training data")
    p.add_argument("--eval-data", default=None, metavar="SPEC",
                   help=spec_help("evaluate on another set of the same classes (its test or val split, else all of it)"))
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=PRECISION_HELP)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_fewshot)

    p = command("predict", help="the most probable classes of image files")
    p.add_argument("ckpt", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...), directories of them, or glob patterns")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=PRECISION_HELP)
    p.add_argument("--json", type=Path, default=None, help="also write one record per image to this JSON file")
    p.set_defaults(func=cmd_predict)

    p = command("inspect", help="the paper's figures for a checkpoint: filters, position similarity, attention "
                                "distance, attention rollout, on one HTML page")
    p.add_argument("ckpt", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files for the attention figures")
    p.add_argument("--images", nargs="+", dest="image_flag", metavar="IMAGE", default=None,
                   help="the same as the positional IMAGEs")
    p.add_argument("--data", metavar="SPEC", help=spec_help("take images from a data spec's evaluation split"))
    p.add_argument("--split", choices=("test", "val"), default=None, help="with --data (default: val, else test)")
    p.add_argument("--num-images", type=int, default=128, help="with --data: how many images")
    p.add_argument("--out", type=Path, required=True, help="output directory (index.html, PNGs, inspect.json)")
    p.add_argument("--num-components", type=int, default=28, help="principal components shown")
    p.add_argument("--num-overlays", type=int, default=8, help="images shown with their rollout")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--image-size", type=_size, default=None,
                   help="inspect at another resolution (position embeddings resized in 2-D)")
    _add_source_hints(p)
    p.add_argument("--json", type=Path, default=None, help="also write the report (inspect.json) to this file")
    p.set_defaults(func=cmd_inspect)

    p = command("serve", help="the model behind HTTP: POST /predict, GET /health, and a page at /",
                description="Serve a classifier over HTTP: POST an image to /predict (the multipart field `file`, or "
                            "the raw body; ?k=5, ?attention=1 for the attention-rollout overlay), GET /health, and "
                            "GET / for a page that shows the top classes and where the model looked. Requests that "
                            "arrive together run as one batch.")
    p.add_argument("ckpt", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-batch", type=int, default=32, help="the most images run as one batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch's first request waits for others to join it")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (413)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=PRECISION_HELP)
    p.set_defaults(func=cmd_serve)


def run() -> None:
    """The `vitlab` program (the console script and `python -m vitlab`): the allocator tuned before torch loads."""
    tune_allocator()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `vitlab models | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
    except USER_ERRORS as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    run()
