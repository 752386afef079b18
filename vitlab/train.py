"""Training a ViT: `train(cfg)`, one loop read top to bottom, and the parts it is made of.

The sections of `train` follow big_vision's `train.py`: setup, data, model, init (scratch | resume | pretrained),
evaluators, loop. The defaults are the paper's (section 4.1, appendix B.1): Adam with β1 = 0.9, β2 = 0.999 and a
decoupled weight decay of 0.1, a linear learning-rate warm-up then a linear decay, gradients clipped at global
norm 1. Fine-tuning (`vitlab finetune`, vitlab.config.FINE_TUNE) is the same loop from pretrained weights (`init`):
SGD with momentum 0.9, no weight decay, warm-up then cosine decay, a new zero head (appendix B.1.1). Masked patch
prediction is the same loop with another objective (vitlab.mpp). The run directory is vitlab.rundir's.

How a run ends (`vitlab train` exit codes): 0 after the last step (with --time-limit, the last the minutes allow:
vitlab.schedule), with `test accuracy: 0.xxxx` (or `val ...`) as the last line printed; 130 / 143 after SIGINT /
SIGTERM, once the step in flight is done and saved (`--resume DIR` continues it); 1 when the loss is not finite,
naming the step, the last checkpoint left as it was; 2 for a configuration error, before any work.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data
from .common import CheckpointError, ConfigError, DataError, atomic_write_text
from .config import TrainConfig
from .evaluate import Classification
from .images import TrainAug, batch_mix, resize
from .model import build_model, forward_flops, mimetic_init_
from .mpp import MaskedPatchObjective, MaskedPatchPrediction
from .resnet import ResNetConfig
from .rundir import (
    FIXED_ON_RESUME,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    RunLog,
    fault_point,
    finish_save,
    load_run,
    rng_state,
    save_run,
    seed_all,
    set_rng_state,
)
from .runtime import autocast, emulated_bf16, normalize, resolve_precision
from .schedule import Schedule
from .transfer import init_from_pretrained
from .weights import load_model, read_config


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, float]:
    """Train the model `cfg` describes, or with `resume` continue the run in cfg.out; the last evaluation.

    Under torchrun every process runs this, with DistributedDataParallel; only process 0 writes.
    """
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # ---- setup -----------------------------------------------------------------------------------------
        proc = stack.enter_context(_process_group())
        stack.enter_context(_deterministic(cfg.deterministic))
        signals = stack.enter_context(StopSignals())
        if cfg.batch_size % (proc.world_size * cfg.accum_steps):
            raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of processes x accum_steps = "
                              f"{proc.world_size} x {cfg.accum_steps}")
        local_batch = cfg.batch_size // proc.world_size  # this process's share of each step
        precision = resolve_precision(cfg.precision, proc.device)
        cfg, out = _run_directory(cfg, resume, proc)
        # Pretrained weights (fine-tuning) decide the architecture and what the images must look like to them:
        # resolution unless changed, channels, normalisation. A resumed run's own checkpoint stands in for them.
        source = source_cfg = None
        if cfg.init is not None:
            if resume and (out / STATE_FILE).exists():
                source_cfg = read_config(out)
            else:
                source = load_model(cfg.init)
                source_cfg = source.cfg
            cfg = cfg.with_source(source_cfg)

        # ---- data ------------------------------------------------------------------------------------------
        aug = TrainAug(crop=cfg.crop, crop_scale=cfg.crop_scale, crop_pad=cfg.crop_pad, flip=cfg.flip,
                       randaugment=cfg.randaugment, trivialaugment=cfg.trivialaugment, autoaugment=cfg.autoaugment)
        splits = data.build(cfg.data, image_size=cfg.image_size, in_chans=cfg.in_chans, train_transform=aug,
                            val_split=cfg.val_split, bad_images=cfg.bad_images, train_images=cfg.train_images,
                            in_memory=cfg.in_memory)
        if not splits.train_size:
            raise DataError(f"{cfg.data}: " + ("no training images" if splits.train_size == 0 else
                            "the number of training images is unknown (remote shards); training needs local data"))
        steps_per_epoch = splits.train_size // cfg.batch_size  # an epoch's last partial batch is dropped
        if steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {splits.train_size} training images")
        total_steps = cfg.steps or cfg.epochs * steps_per_epoch

        # ---- model -----------------------------------------------------------------------------------------
        model_cfg = cfg.model_config(splits.num_classes, splits.class_names, source=source_cfg)
        seed_all(cfg.seed)
        model = build_model(model_cfg).to(proc.device)  # the official initialisers, from the seed
        if cfg.attention_init == "mimetic":
            mimetic_init_(model)
        optimizer = make_optimizer(model, cfg, proc.device)
        mpp = cfg.objective == "mpp"
        objective = (MaskedPatchObjective(model_cfg, proc.device, precision) if mpp else
                     ClassificationObjective(model_cfg, proc.device, precision, cfg.label_smoothing,
                                             batch_mix(cfg.mixup, cfg.cutmix, splits.num_classes)))

        # ---- init: scratch (above) | resume (the run's last checkpoint) | pretrained (fine-tuning) -----------
        at, saved_rng, saved_schedule, trained_flops = Position(), None, None, 0
        if source is not None:
            message = init_from_pretrained(model, source, cfg.init)  # section 3.2, appendix B.1.1
            if proc.is_main:
                print(message)
            del source
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None  # the run's model, when there is one
        if resume and (out / STATE_FILE).exists():
            at, saved_rng, saved_schedule, trained_flops = _resume(out, model, optimizer, ema, cfg, proc)
        schedule = Schedule(cfg, total_steps, cfg.eval_every or cfg.eval_epochs * steps_per_epoch,
                            time.perf_counter() - started, at.step, saved_schedule)  # a fixed length, or a time limit's
        run_model = model if ema is None else ema.module  # what is evaluated and saved as the run's model
        last_saved = at.step if at.step else None
        seed_all(cfg.seed + 1 + proc.rank)  # each process's own dropout stream (a resume restores its saved one)
        net = _compiled(model, cfg, proc, total_steps - at.step)
        train_net = nn.parallel.DistributedDataParallel(
            net, device_ids=[proc.device] if proc.device.type == "cuda" else None) if proc.distributed else net

        # ---- evaluators ------------------------------------------------------------------------------------
        # Process 0 evaluates the whole split with the model outside DDP while the others wait at a barrier.
        evaluators = []
        eval_set = _evaluation_set(cfg, splits) if proc.is_main else None
        if eval_set is not None:
            kind = MaskedPatchPrediction if mpp else Classification
            if mpp:
                eval_set.pop("label_map", None)  # the targets are colours
            else:
                eval_set["tta"] = cfg.tta
            evaluators.append(kind(**eval_set, batch_size=local_batch // cfg.accum_steps, device=proc.device,
                                   precision=precision, num_workers=cfg.num_workers))
        log = None
        if proc.is_main:  # DIR is written once the data and the model are known to load
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
            log = stack.enter_context(contextlib.closing(RunLog(out, at.step, started)))
            print(_describe(out, cfg, model, splits, total_steps, proc, precision, net is not model, at.step))
        bar = stack.enter_context(tqdm(total=total_steps, initial=at.step, unit="step", dynamic_ncols=True,
                                       disable=not proc.is_main))
        metrics = StepMetrics(log, bar, proc, steps_per_epoch, cfg.batch_size, model_cfg, trained_flops, at.step)

        # ---- loop ------------------------------------------------------------------------------------------
        results, evaluated, size = {}, None, None  # the last evaluation, made at step `evaluated`; the last step's size
        while not schedule.done:
            loader = data.make_loader(
                splits.train, local_batch, shuffle=True, seed=cfg.seed, epoch=at.epoch, start_batch=at.batch,
                num_workers=cfg.num_workers, drop_last=True, rank=proc.rank, world_size=proc.world_size,
                pin_memory=proc.device.type == "cuda",
            )
            if saved_rng is not None:  # restored here, after all that a resume does before its first step
                set_rng_state(saved_rng)
                saved_rng = None
            metrics.start_window()
            for batch, epoch_end in _epoch_batches(loader, steps_per_epoch - at.batch):
                if batch is None:
                    raise DataError(f"every image of batch {at.batch} of epoch {at.epoch} is unreadable")
                lr = schedule.lr(at.step)
                seed = (cfg.seed * 1_000_003 + at.step) * 4096 + proc.rank  # this step's mixing or corruption
                size, last_size = schedule.image_size(), size  # progressive resizing: a new size compiles again
                with schedule.aside() if last_size not in (None, size) else contextlib.nullcontext():
                    stats = train_step(train_net, model, optimizer, objective, resize(batch[0], size), batch[1], lr,
                                       seed, cfg, proc)
                if ema is not None:
                    ema.update(model)
                schedule.advance()
                at = at.next(epoch_end)
                metrics.add(at.step, lr, stats, size)
                fault_point("step", at.step)
                done = schedule.done
                save_now = done or (at.step % cfg.save_every == 0 if cfg.save_every else epoch_end)
                stop = False
                if (at.step % cfg.log_every == 0 or epoch_end or save_now
                        or (signals.received and not proc.distributed)):
                    stop = metrics.flush(signals.received is not None, out, last_saved)
                    schedule.replan(at.step, proc.distributed, proc.device)  # with a time limit: the steps left
                    bar.total = at.step + schedule.steps_left
                if done or (at.step % cfg.eval_every == 0 if cfg.eval_every
                            else epoch_end and at.epoch % cfg.eval_epochs == 0):
                    with schedule.aside(evaluation=True):
                        results = run_evaluators(evaluators, run_model, log, at.step, steps_per_epoch, proc)
                    evaluated = at.step
                if save_now or stop:
                    with schedule.aside():
                        last_saved = _save(out, model, optimizer, ema, at, schedule, metrics.flops, cfg, proc)
                if stop and not done:
                    signum = signals.received or signal.SIGTERM  # (another process may have received it)
                    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {at.step}; saved "
                                          f"{out}; continue with: vitlab train --resume {out}", exit_code=128 + signum)
                if done:
                    break
        if evaluated != at.step:  # resumed from the last step: evaluate again to report
            results = run_evaluators(evaluators, run_model, log, at.step, steps_per_epoch, proc)

    if proc.is_main:
        _report(out, cfg, splits, evaluators, results, at.step, total_steps)
    return results


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


class ClassificationObjective:
    """Classification as a training objective: `batches` normalises a step's batch (and mixes it, MixUp or
    CutMix, into soft targets) and cuts it into micro-batches; `loss` gives a micro-batch's summed cross-entropy
    (with label smoothing) and how many images it classified right. vitlab.mpp.MaskedPatchObjective is the other."""

    def __init__(self, cfg, device: torch.device, precision: str, label_smoothing: float = 0.0, mix=None):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.label_smoothing, self.mix = label_smoothing, mix

    def batches(self, images: torch.Tensor, labels: torch.Tensor, seed: int, parts: int) -> tuple[list, int]:
        x = normalize(images, self.cfg.mean, self.cfg.std)  # (B, C, H, W) float32
        targets = labels
        if self.mix is not None:  # soft targets (B, K), drawn from a function of (seed, step, process)
            x, targets = self.mix(x, labels, seed=seed)
        return [m for m in zip(x.tensor_split(parts), targets.tensor_split(parts)) if len(m[0])], len(x)

    def loss(self, net: nn.Module, micro) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = micro
        with autocast(self.device, self.precision):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(-1) == (targets if targets.ndim == 1 else targets.argmax(-1))).sum()


def train_step(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, objective, images: torch.Tensor,
               labels: torch.Tensor, lr: float, seed: int, cfg: TrainConfig, proc: "Process") -> torch.Tensor:
    """One optimizer step; (loss, accuracy, gradient norm), left on the device.

    The batch is prepared whole (normalised, mixed or corrupted), then cut into accum_steps micro-batches; each
    micro-batch's loss is its summed loss over the whole batch's size n, so the accumulated gradient is that of the
    batch's mean loss: the update of one large batch. DDP averages the processes' gradients in the last
    micro-batch's backward only (no_sync before it).
    """
    images = images.to(proc.device, non_blocking=True)
    labels = labels.to(proc.device, non_blocking=True)
    micro, n = objective.batches(images, labels, seed, cfg.accum_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum = torch.zeros((), device=proc.device)
    correct = torch.zeros((), device=proc.device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with net.no_sync() if proc.distributed and not last else contextlib.nullcontext():
            loss, hits = objective.loss(net, batch)
            loss = loss / n
            loss.backward()
        loss_sum += loss.detach()
        correct += hits
    grad_norm = torch.zeros((), device=proc.device)
    if cfg.grad_clip:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss_sum, correct / n, grad_norm.float()])


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on the weight matrices and kernels only; with `layer_decay`, a learning rate per
    layer (each group's `lr_scale`).

    Biases, LayerNorm and GroupNorm parameters, the position embeddings, the [class] and [mask] tokens are not
    decayed, as in big_vision (whose decay applies to `.../kernel` parameters only) and timm. PyTorch's AdamW
    multiplies the decay by the learning rate, as flax.optim.Adam did in the paper's code, so the paper's 0.1 means
    the same here.
    """
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decayed = not (p.ndim < 2 or name in ("pos_embed", "cls_token", "mask_token"))
        groups.setdefault((layer_id(name, model.cfg) if cfg.layer_decay else 0, decayed), []).append(p)
    scale = (lambda layer: cfg.layer_decay ** (model.cfg.num_layers + 1 - layer)) if cfg.layer_decay else (lambda _: 1.0)
    param_groups = [dict(params=params, weight_decay=cfg.weight_decay if decayed else 0.0, lr_scale=scale(layer))
                    for (layer, decayed), params in sorted(groups.items(), key=lambda g: (g[0][0], not g[0][1]))]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernel does AdamW's arithmetic in one pass per tensor: on a CPU ~4.5x faster than the foreach default
    # (benchmarks/parts_speed.py: 2.4 ms against 10.8 ms for 2.7M parameters, beside a ~100 ms training step).
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cpu", "cuda"))


def layer_id(name: str, cfg) -> int:
    """A parameter's layer for layer-wise learning-rate decay, as BEiT counts them: 0 for the embeddings (patches,
    a hybrid's stem, [class] and [mask] tokens, positions), i + 1 for block i, L + 1 for the final norm and heads."""
    if not hasattr(cfg, "num_heads"):
        raise ConfigError(f"layer_decay applies to ViTs, not to the BiT ResNet {cfg.name}")
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return cfg.num_layers + 1


class EMA:
    """An exponential moving average of a model's weights (Polyak averaging, as DeiT and AugReg keep one), the
    model a run evaluates and saves. After each optimizer step t (counted from 1) every floating-point parameter
    and buffer moves to `ema + (1 - d_t) (weight - ema)` with d_t = min(decay, (1 + t) / (10 + t)): TensorFlow's
    ExponentialMovingAverage warm-up, so that a short run does not keep its initialisation. Written here rather than
    through torch.optim.swa_utils.AveragedModel, whose step count lives on the device and would sync every step."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.updates = decay, updates

    def tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.tensors(self.module), self.tensors(model), 1.0 - d)


def _epoch_batches(loader, limit: int):
    """The loader's first `limit` batches, each with whether it is the epoch's last."""
    end = object()
    batches = iter(islice(loader, limit))
    batch = next(batches, end)
    while batch is not end:
        following = next(batches, end)
        yield batch, following is end
        batch = following



# --------------------------------------------------------------------------------------------------------------
# The loop's bookkeeping
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a run is: optimizer steps done, the epoch, and the batches of it consumed."""

    step: int = 0
    epoch: int = 0
    batch: int = 0

    def next(self, epoch_end: bool) -> "Position":
        """The position after one more step."""
        if epoch_end:
            return Position(self.step + 1, self.epoch + 1, 0)
        return Position(self.step + 1, self.epoch, self.batch + 1)


class StepMetrics:
    """The training steps' metrics. They stay on the device until `flush`, every log_every steps (and before
    evaluating, saving or stopping), in one transfer: the loop's only host-device sync. Across processes they are
    averaged in one all_reduce that also carries each process's stop request, so that all processes stop after
    the same step. Each row carries the training FLOPs so far, for compute-vs-accuracy plots."""

    def __init__(self, log: RunLog | None, bar, proc: "Process", steps_per_epoch: int, batch_size: int, model_cfg,
                 flops: int | None, step: int):
        self.log, self.bar, self.proc = log, bar, proc
        self.steps_per_epoch, self.batch_size, self.model_cfg = steps_per_epoch, batch_size, model_cfg
        self.image_flops: dict[tuple[int, int], int] = {}  # {image size: the training FLOPs of an image}
        # the training FLOPs of the steps so far (the global batch's); a run saved before its training state counted
        # them trained at image_size
        self.flops = flops if flops is not None else self._flops_of(tuple(model_cfg.image_size)) * batch_size * step
        self.pending: list[tuple[int, float, torch.Tensor, int]] = []  # (step, lr, stats on the device, FLOPs)
        self.start_window()

    def start_window(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def add(self, step: int, lr: float, stats: torch.Tensor, size: tuple[int, int]) -> None:
        self.flops += self._flops_of(size) * self.batch_size
        self.pending.append((step, lr, stats, self.flops))
        self.window_steps += 1

    def _flops_of(self, size: tuple[int, int]) -> int:
        """A trained image's FLOPs at `size`: a backward pass costs about two forward passes (one product for the
        activations' gradients, one for the weights'), so three forwards."""
        if size not in self.image_flops:
            self.image_flops[size] = 3 * forward_flops(self.model_cfg.replace(image_size=size))
        return self.image_flops[size]

    def flush(self, stop: bool, out: Path, last_saved: int | None) -> bool:
        """Write the pending steps' metrics, stopping at a non-finite loss; True when a process must stop."""
        device = self.proc.device
        stats = torch.stack([s for _, _, s, _ in self.pending]) if self.pending else torch.zeros(0, 3, device=device)
        if self.proc.distributed:  # the processes' mean metrics, and whether any of them must stop
            packet = torch.cat([stats.flatten(), torch.tensor([float(stop)], device=device)])
            dist.all_reduce(packet)
            stats, stop = (packet[:-1] / self.proc.world_size).view(-1, 3), packet[-1].item() > 0
        elapsed = time.perf_counter() - self.window_start
        img_s = self.window_steps * self.batch_size / elapsed if elapsed > 0 else 0.0
        for (s, lr, _, flops), (loss, acc, grad_norm) in zip(self.pending, stats.tolist()):
            if not math.isfinite(loss):
                kept = f"{out} keeps step {last_saved}" if last_saved is not None else "nothing was saved"
                raise TrainingStopped(f"error: the loss is {loss} at step {s}; stopped ({kept})", exit_code=1)
            if self.log is not None:
                self.log.write(dict(split="train", step=s, epoch=round(s / self.steps_per_epoch, 4), loss=loss,
                                    acc=acc, lr=lr, img_s=round(img_s, 1), grad_norm=grad_norm,
                                    train_flops=flops))
        if self.log is not None and self.pending:
            self.log.flush()
            self.bar.update(self.pending[-1][0] - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
        self.pending.clear()
        self.start_window()
        return stop


def run_evaluators(evaluators: list, net: nn.Module, log: RunLog | None, step: int, steps_per_epoch: int,
                   proc: "Process") -> dict[str, float]:
    """Run every evaluator on process 0 (the others wait), log its results; the last one's."""
    results: dict[str, float] = {}
    for evaluator in evaluators:
        results = evaluator.run(net)
        log.write(dict(split=evaluator.name, step=step, epoch=round(step / steps_per_epoch, 4), **results))
    if log is not None:
        log.flush()
        log.plot()
    if proc.distributed:
        dist.barrier()
    return results


def _save(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, at: Position,
          schedule: Schedule, trained_flops: int, cfg: TrainConfig, proc: "Process") -> int:
    """Save the run's model and the training state of this step (process 0, with every process's RNG state; with
    an EMA, the EMA is the run's model and the trained weights go into the training state)."""
    rngs = [rng_state()]
    if proc.distributed:
        rngs = [None] * proc.world_size
        dist.all_gather_object(rngs, rng_state())
    if proc.is_main:
        state = dict(step=at.step, epoch=at.epoch, batch=at.batch, rng=rngs, optimizer=optimizer.state_dict(),
                     config={k: getattr(cfg, k) for k in FIXED_ON_RESUME}, schedule=schedule.state(),
                     train_flops=trained_flops)
        if ema is not None:
            state.update(model=model.state_dict(), ema_updates=ema.updates)
        save_run(out, model if ema is None else ema.module, state)
    return at.step


def _resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, cfg: TrainConfig,
            proc: "Process") -> tuple[Position, dict | None, dict | None, int | None]:
    """The run's last checkpoint loaded into the model, its EMA and the optimizer: where it stood, this process's
    RNG state to restore before the first step (None when the run was saved by another number of processes), its
    schedule's state (Schedule.state; None from a run saved before there was one) and the FLOPs it had trained
    (None from a run saved before they were counted)."""
    state = load_run(out, model, optimizer, ema.module if ema is not None else None)
    for name in FIXED_ON_RESUME:
        if state["config"].get(name) != getattr(cfg, name):
            raise ConfigError(f"{name} cannot change when a run resumes ({state['config'].get(name)} -> "
                              f"{getattr(cfg, name)})")
    if ema is not None:
        ema.updates = state["ema_updates"]
    at, schedule = Position(state["step"], state["epoch"], state["batch"]), state.get("schedule")
    if schedule is not None and not (isinstance(schedule, dict) and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in schedule.values())):
        raise CheckpointError(f"{out / STATE_FILE}: its schedule state is not numbers ({schedule!r:.60})")
    flops = state.get("train_flops")
    if flops is not None and not isinstance(flops, int):
        raise CheckpointError(f"{out / STATE_FILE}: its train_flops is not an int ({flops!r:.60})")
    if len(state["rng"]) == proc.world_size:
        return at, state["rng"][proc.rank], schedule, flops
    if proc.is_main:
        print(f"resuming on {proc.world_size} processes a run saved on {len(state['rng'])}: new random streams")
    return at, None, schedule, flops


# Below this many steps a CPU run does not earn back torch.compile's 30-60 s of compiling (measured here: +18% per
# step for the demo's model, +25% for ViT-Ti/4 at 32 px, benchmarks/step_speed.py).
COMPILE_MIN_CPU_STEPS = 1000


def _compiled(model: nn.Module, cfg: TrainConfig, proc: "Process", steps: int) -> nn.Module:
    """The module the training step runs: `torch.compile(model)` when cfg.compile says so, or by default on GPUs
    and for CPU runs long enough to pay for it; a default compile that fails falls back to eager (the evaluators
    run the uncompiled model: eval mode and the last partial batch would each compile again). With
    progressive_sizes each size compiles its own static graph, not one of symbolic shapes."""
    wanted = cfg.compile if cfg.compile is not None else (
        proc.device.type == "cuda" or steps >= COMPILE_MIN_CPU_STEPS)
    if not wanted:
        return model
    if cfg.compile is None:
        import torch._dynamo as dynamo  # (bound as `dynamo`: `import torch._dynamo` would make torch local here)

        dynamo.config.suppress_errors = True  # no C++ compiler, an unsupported op: run eagerly
    return torch.compile(model, dynamic=False if cfg.progressive_sizes else None)


def _evaluation_set(cfg: TrainConfig, splits) -> dict | None:
    """What the run evaluates on, as Classification's arguments: --eval-data's evaluation set (its test or val split,
    else all of it), its classes matched to the training data's by name, else the training data's val or test
    split; None when there is none."""
    if cfg.eval_data is None:
        return None if splits.eval is None else dict(dataset=splits.eval, name=splits.eval_name)
    dataset, name, class_names = data.build_eval(cfg.eval_data, image_size=cfg.image_size, in_chans=cfg.in_chans,
                                                 bad_images=cfg.bad_images)
    label_map = data.match_classes(class_names, splits.class_names, cfg.eval_data)
    if label_map is None and len(class_names) != splits.num_classes:
        raise DataError(f"{cfg.eval_data} has {len(class_names)} classes, the training data {cfg.data} "
                        f"{splits.num_classes}")
    return dict(dataset=dataset, name="eval" if name == "all" else name, label_map=label_map)


def _run_directory(cfg: TrainConfig, resume: bool, proc: "Process") -> tuple[TrainConfig, Path]:
    """The run's directory (named by process 0's clock when not given), checked: a new run may not overwrite
    one, a resumed run must be one, and a save a killed run committed but did not finish is finished first."""
    if cfg.out is None:  # one name for all processes
        name = [time.strftime("runs/%Y%m%d-%H%M%S")]
        if proc.distributed:
            dist.broadcast_object_list(name, src=0)
        cfg = dataclasses.replace(cfg, out=name[0])
    out = Path(cfg.out)
    if resume:
        if not (out / TRAIN_CONFIG_FILE).is_file():
            raise CheckpointError(f"{out}: no {TRAIN_CONFIG_FILE}: not a training run to resume")
        if proc.is_main:
            finish_save(out)
    elif (out / TRAIN_CONFIG_FILE).exists() or (out / STATE_FILE).exists():
        raise ConfigError(f"{out} already holds a run: continue it with `vitlab train --resume {out}`, "
                          "or choose another --out")
    if proc.distributed:
        dist.barrier()  # all have checked DIR, and a save a killed run left is finished, before DIR is read
    return cfg, out


def _report(out: Path, cfg: TrainConfig, splits, evaluators: list, results: dict[str, float], step: int,
            total_steps: int) -> None:
    """The lines a run ends with, the last one its accuracy."""
    skipped = getattr(splits.train, "skipped", 0)
    if skipped:
        print(f"skipped {skipped} unreadable training images")
    if cfg.time_limit and step < total_steps:
        print(f"the time limit ({cfg.time_limit:g} min) ended the run after {step} of at most {total_steps} "
              f"steps ({step / (splits.train_size // cfg.batch_size):.1f} epochs)")
    print(f"saved {out}")
    if evaluators:
        what = " (masked patch prediction: mean colours of the corrupted patches)" if cfg.objective == "mpp" else ""
        print(f"{evaluators[0].name} accuracy{what}: {results['top1']:.4f}")
    else:
        print("no val or test split to measure accuracy on: pass --val-split FRACTION")


def _describe(out: Path, cfg: TrainConfig, model: nn.Module, splits, total_steps: int, proc: "Process",
              precision: str, compiled: bool, step: int) -> str:
    """The line a run starts with: the model, the data, the steps, the processes."""
    m = model.cfg
    what = ""
    if not isinstance(m, ResNetConfig):
        patch = f"{m.patch_size[0]}x{m.patch_size[1]}"
        if m.stem_stride != 1:
            patch += f" on the ResNet stem's feature map (stride {m.stem_stride})"
        what = f", {m.num_patches} patches of {patch}"
        if m.mpp_classes:
            what += f", masked patch prediction of {m.mpp_classes} colours"
    how = precision + (", compiled" if compiled else "")
    if emulated_bf16(precision, proc.device):
        how += " (bf16 emulated: this CPU has no bf16 instructions, and fp32 is many times faster: --precision auto)"
    limit = f" at most, as many as {cfg.time_limit:g} minutes allow" if cfg.time_limit else ""
    if cfg.progressive_sizes:
        sizes = ", then ".join(f"{s} px" for s in cfg.progressive_sizes)
        limit += f", the first {cfg.progressive_until:.0%} at {sizes} (progressive resizing)"
    return (f"{out}: {m.name or 'ViT'} ({sum(p.numel() for p in model.parameters()):,} parameters{what}); "
            f"{cfg.data}: {splits.train_size} training images, {splits.num_classes} classes; {total_steps} steps of "
            f"{cfg.batch_size} images{limit}; {proc.world_size} process{'es' if proc.distributed else ''} on "
            f"{proc.device.type}, {how}" + ("; evaluated with flip test-time augmentation" if cfg.tta == "flip" else "")
            + (f"; resuming at step {step}" if step else ""))


# --------------------------------------------------------------------------------------------------------------
# Processes and signals
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """This process: its rank among world_size processes (torchrun), and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class TrainingStopped(Exception):
    """The run stopped before its last step: by a signal (saved first) or a non-finite loss (nothing saved)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the step in flight; a second one interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch.use_deterministic_algorithms for the run, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _process_group():
    """This process (rank, world_size, device); under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), the
    process group of DistributedDataParallel for the duration: gloo on CPUs, NCCL on GPUs."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size == 1:
        yield Process(0, 1, device)
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Process(rank, world_size, device)
    finally:
        dist.destroy_process_group()

