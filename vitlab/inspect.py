"""Inspecting a ViT: the paper's figures (section 4.5, Fig. 6, 7, 10, 11) for any checkpoint vitlab can load.

    vitlab inspect CKPT [--images PATH... | --data SPEC] --out DIR

writes into DIR one PNG per figure, `inspect.json` (the numbers behind them), `inspect.npz` (the arrays too big
for JSON: every principal component, the position similarities, the rollout maps) and `index.html`, a page that
shows it all with a line on how to read each figure:

1. embedding filters (Fig. 7 left): principal components of the patch-embedding filters E (Eq. 1);
2. position-embedding similarity (Fig. 7 centre, Fig. 10): cosine similarity of each grid position's E_pos with
   every other's;
3. mean attention distance (Fig. 7 right, Fig. 11): per head and layer, how far in pixels a patch looks;
4. attention rollout (Fig. 6, appendix D.8, after Abnar and Zuidema 2020): what the output token attends to in
   the input, through all layers.

1 and 2 read the weights only; 3 and 4 need images. The mathematics is in small functions on tensors at the
top, the model is run by `attention_statistics`, the figures (matplotlib's object API with the Agg canvas: no
pyplot, no global backend switched) and the page come after, and `run` ties them together.

Memory stays bounded for any model and image count: the encoder is run block by block here (the tokens z_0 by the
model's own `embed` (Eq. 1), then each `block(x, need_weights=True)`), and each layer's attention map
(B, heads, T, T) is reduced to its distances and folded into the rollout before the next layer runs, so one layer's
maps of one batch are alive at a time. A test checks the logits equal `model(x)`'s.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data
from .common import DataError, atomic_write, atomic_write_text
from .images import TrainAug, decode_image, eval_transform
from .runtime import eval_mode, forward, model_device, unwrap

FIGURES = {
    "embedding_filters": "embedding_filters.png",
    "position_similarity": "position_similarity.png",
    "attention_distance": "attention_distance.png",
    "attention_rollout": "attention_rollout.png",
}
JSON_FILE, ARRAYS_FILE, PAGE_FILE = "inspect.json", "inspect.npz", "index.html"


# --------------------------------------------------------------------------------------------------------------
# The mathematics: pure functions on tensors
# --------------------------------------------------------------------------------------------------------------


def embedding_pcs(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Principal components of the D filters of a (D, C, P_h, P_w) patch embedding: (K, C, P_h, P_w), and the
    fraction of the variance each explains (K,), descending; K = min(D, C·P_h·P_w). Float64."""
    # Each output unit's filter is one C·P_h·P_w vector; PCA over the D of them: centre, then the right singular
    # vectors are the components and the squared singular values their variances (Fig. 7 left).
    D = weight.shape[0]
    X = weight.detach().to("cpu", torch.float64).reshape(D, -1)
    X = X - X.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # S descending, rows of Vh orthonormal
    variance = S**2
    total = variance.sum()
    explained = variance / total if total > 0 else torch.zeros_like(variance)
    # A singular vector's sign is arbitrary: make each component's largest entry positive, so runs agree.
    peak = Vh.gather(1, Vh.abs().argmax(1, keepdim=True))
    Vh = Vh * torch.where(peak < 0, -1.0, 1.0)
    return Vh.reshape(-1, *weight.shape[1:]), explained


def pos_embed_similarity(pos_embed: Tensor, grid: Sequence[int], num_prefix: int) -> Tensor:
    """Cosine similarity of every grid position's embedding with every other's: (h, w, h, w), [i, j] the tile of
    position (i, j). The prefix ([class]) embeddings are left out. Float64."""
    h, w = grid
    pe = pos_embed.detach().to("cpu", torch.float64).reshape(-1, pos_embed.shape[-1])[num_prefix:]  # (N, D)
    if pe.shape[0] != h * w:
        raise ValueError(f"{pe.shape[0]} position embeddings after {num_prefix} prefix token(s) do not fill a "
                         f"{h}x{w} grid")
    pe = F.normalize(pe, dim=-1)
    return (pe @ pe.T).reshape(h, w, h, w)


def pixel_pitch(cfg) -> tuple[float, float]:
    """Pixels between neighbouring tokens' centres: image size / grid (the patch size for a plain ViT, the
    stem's stride for a hybrid)."""
    return (cfg.image_size[0] / cfg.grid_size[0], cfg.image_size[1] / cfg.grid_size[1])


def patch_distances(grid: Sequence[int], patch_size: Sequence[float]) -> Tensor:
    """Euclidean distances in pixels between the centres of the (h·w) patches, row-major: (N, N). Float64."""
    (h, w), (ph, pw) = grid, patch_size
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64) * ph,
                                torch.arange(w, dtype=torch.float64) * pw, indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (N, 2); the half-patch offset cancels
    return (centres[:, None] - centres[None]).norm(dim=-1)  # direct, so the diagonal is exactly 0


def mean_attention_distance(attn: Tensor, distances: Tensor, num_prefix: int) -> Tensor:
    """Mean attention distance of each head (H,), averaged over the images of `attn` (B, H, T, T).

    The definition behind the authors' plot (google-research/vision_transformer issue #162): over the patch
    tokens only, the sum over keys of attention weight × pixel distance between query and key, averaged over
    the queries. The weights are the softmax's, not re-normalised after the prefix column is dropped.
    """
    B, H, T, _ = attn.shape
    N = distances.shape[0]
    if T != N + num_prefix:
        raise ValueError(f"attention over {T} tokens does not match {N} patches + {num_prefix} prefix token(s)")
    # Distance 0 on the prefix rows and columns drops them from the sum; the sum over queries and keys is then
    # one dot product per (image, head), with no (B, H, T, T) temporary.
    d = attn.new_zeros(T, T)
    d[num_prefix:, num_prefix:] = distances.to(attn.dtype)
    per_image = attn.reshape(B, H, T * T) @ d.flatten() / N  # (B, H)
    return per_image.mean(0)


def rollout_step(rollout: Tensor | None, attn: Tensor) -> Tensor:
    """Fold one layer's attention (B, H, T, T) into the rollout so far (B, T, T) (None before the first layer)."""
    a = attn.mean(1)  # heads averaged
    a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # the residual connection
    a = a / a.sum(-1, keepdim=True)
    return a if rollout is None else a @ rollout  # layer l's tokens as mixtures of the input tokens


def attention_rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of the layers' maps, first layer first: (B, T, T), rows
    summing to 1, row i the share of each input token in output token i."""
    rollout = None
    for attn in maps:
        rollout = rollout_step(rollout, attn)
    return rollout


def rollout_to_grid(rollout: Tensor, grid: Sequence[int], num_prefix: int) -> Tensor:
    """The output token's rollout over the patches (B, h, w): the [class] token's row, or, for a "gap" model
    (no prefix token: the classifier averages every token), the mean over the query rows."""
    row = rollout[:, 0] if num_prefix else rollout.mean(1)  # (B, T)
    return row[:, num_prefix:].reshape(len(rollout), *grid)


# --------------------------------------------------------------------------------------------------------------
# Running the model, one layer at a time
# --------------------------------------------------------------------------------------------------------------


def check_inspectable(model: nn.Module) -> None:
    """A ValueError naming what is missing when `model` is not a ViT this module can take apart."""
    missing = [name for name in ("cfg", "patch_embed", "pos_embed", "embed", "blocks", "norm", "forward_head")
               if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {', '.join(missing)}: not a ViT vitlab can inspect")


@torch.no_grad()
def attention_statistics(model: nn.Module, images: Tensor, *, batch_size: int = 32, keep: int = 8) -> dict:
    """Run `model` over uint8 images (B, C, H, W) at its resolution, block by block.

    Returns `mean_attention_distance` (L, H) in pixels averaged over all images, `rollout` (min(B, keep), h, w)
    for the first `keep` images, and `logits` (B, num_classes) (None for a model without a head).
    """
    cfg = model.cfg
    device = model_device(model)
    p = cfg.num_prefix_tokens
    distances = patch_distances(cfg.grid_size, pixel_pitch(cfg)).to(device, torch.float32)
    totals: list[Tensor] = []  # per layer, the distance summed over images (H,)
    rollouts, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        x = forward(model, batch, call=model.embed)  # z_0, Eq. 1
        rollout = None
        for i, block in enumerate(model.blocks):
            x, attn = block(x, need_weights=True)  # attn (B, H, T, T): reduced here, dropped at the next layer
            attn = attn.float()
            distance = mean_attention_distance(attn, distances, p).double().cpu() * len(batch)
            if i == len(totals):
                totals.append(distance)
            else:
                totals[i] += distance
            if start < keep:
                rollout = rollout_step(rollout, attn)
            del attn
        if rollout is not None:
            rollouts.append(rollout_to_grid(rollout, cfg.grid_size, p)[: keep - start].cpu())
        if cfg.num_classes:
            logits.append(model.forward_head(model.norm(x)).float().cpu())
    return dict(
        mean_attention_distance=torch.stack(totals) / len(images),
        rollout=torch.cat(rollouts) if rollouts else torch.zeros(0, *cfg.grid_size),
        logits=torch.cat(logits) if logits else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Figures: matplotlib's object API on the Agg canvas
# --------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path, dpi: int = 110) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _filter_tile(component: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A (C, P_h, P_w) component as an image scaled to [0, 1]: RGB for 3 channels, else grey, channels side
    by side."""
    lo, hi = component.min(), component.max()
    c = (component - lo) / (hi - lo) if hi > lo else np.full_like(component, 0.5)
    if c.shape[0] == 3:
        return c.transpose(1, 2, 0), None
    return np.concatenate(list(c), axis=1), "gray"


def plot_embedding_filters(components: Tensor, explained: Tensor, path: Path, columns: int = 7) -> None:
    """The first principal components as P_h×P_w tiles, each titled with the variance it explains."""
    k = len(components)
    columns = min(columns, k)
    rows = math.ceil(k / columns)
    C, tile_h, tile_w = components.shape[1:]
    aspect = min(2.0, max(0.5, tile_h / (tile_w if C == 3 else C * tile_w)))  # grey channels lie side by side
    fig = _figure(1.25 * columns + 0.2, (1.0 * aspect + 0.35) * rows + 0.4)
    for i in range(k):
        ax = fig.add_subplot(rows, columns, i + 1)
        tile, cmap = _filter_tile(components[i].numpy())
        ax.imshow(tile, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{i + 1}: {100 * float(explained[i]):.1f}%", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"Principal components of the patch-embedding filters ({100 * float(explained[:k].sum()):.0f}% "
                 "of the variance)", fontsize=10)
    _save(fig, path)


def plot_position_similarity(similarity: Tensor, path: Path) -> None:
    """A grid of grids: tile (i, j) is position (i, j)'s cosine similarity with every position."""
    h, w = similarity.shape[:2]
    mosaic = np.full((h * (h + 1) - 1, w * (w + 1) - 1), np.nan)  # one blank pixel between tiles
    for i in range(h):
        for j in range(w):
            mosaic[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = similarity[i, j].numpy()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    side = 6.0
    fig = _figure(side * min(1.0, mosaic.shape[1] / mosaic.shape[0]) + 1.9,
                  side * min(1.0, mosaic.shape[0] / mosaic.shape[1]) + 0.8)
    ax = fig.add_subplot()
    im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    step_r, step_c = max(1, h // 12), max(1, w // 12)  # at most a dozen tick labels per axis
    ax.set_yticks([i * (h + 1) + (h - 1) / 2 for i in range(0, h, step_r)], [str(i + 1) for i in range(0, h, step_r)])
    ax.set_xticks([j * (w + 1) + (w - 1) / 2 for j in range(0, w, step_c)], [str(j + 1) for j in range(0, w, step_c)])
    ax.tick_params(length=0, labelsize=8)
    ax.set_ylabel("Input patch row")
    ax.set_xlabel("Input patch column")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Cosine similarity")
    fig.suptitle("Position embedding similarity", fontsize=10)
    _save(fig, path, dpi=max(110, math.ceil(1.3 * mosaic.shape[1] / side)))  # every mosaic pixel at least one dot


def plot_attention_distance(distance: Tensor, path: Path, uniform: float) -> None:
    """Mean attention distance of every head against depth; the dashed line is uniform attention over patches."""
    import matplotlib

    L, H = distance.shape
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab20" if H > 10 else "tab10"]
    depth = np.arange(1, L + 1)
    for h in range(H):
        ax.scatter(depth, distance[:, h].numpy(), s=16, color=colours(h % colours.N), label=f"Head {h + 1}")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform over\npatches")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_ylim(0, 1.08 * max(float(distance.max()), uniform) or 1.0)
    ax.set_xticks(depth if L <= 24 else depth[:: math.ceil(L / 24)])
    if H <= 16:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Size of the attended area by head and depth", fontsize=10)
    _save(fig, path)


def _as_display(image: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) -> float (H, W, 3) or (H, W) in [0, 1]."""
    x = image.astype(np.float32) / 255
    return x.transpose(1, 2, 0) if x.shape[0] == 3 else x[0]


def plot_rollout(images: Tensor, masks: Tensor, titles: list[str], path: Path, caption: str) -> None:
    """Each image (top) and the image weighted by its rollout mask, scaled to its maximum (bottom), as Fig. 6."""
    n, _, H, W = images.shape
    up = F.interpolate(masks[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    up = up / up.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    col = 2.0
    fig = _figure(col * n + 0.2, 2 * col * H / W + 0.9)
    for k in range(n):
        image = _as_display(images[k].numpy())
        mask = up[k].clamp(0, 1).numpy()
        attended = image * (mask[..., None] if image.ndim == 3 else mask)
        for row, shown in enumerate((image, attended)):
            ax = fig.add_subplot(2, n, row * n + k + 1)
            ax.imshow(shown, cmap=None if shown.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(titles[k], fontsize=7)
    fig.suptitle(caption, fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

HOW_TO_READ = {
    "embedding_filters": (
        "Each tile is one principal component of the patch-embedding filters E (Eq. 1), a direction in the space "
        "of P×P patches, with the share of the filters' variance it explains. A trained ViT's look like "
        "plausible basis functions for a low-dimensional representation of each patch's fine structure: blobs, "
        "edges and gratings of rising frequency (paper, Fig. 7 left). An untrained model's are noise."
    ),
    "position_similarity": (
        "Tile (row, column) shows the cosine similarity of that patch position's embedding with every other "
        "position's (bright = similar). Learned embeddings encode distance: close patches have similar "
        "embeddings, and the row-column structure shows as bright rows and columns through each tile's own "
        "position (paper, Fig. 7 centre and Fig. 10); an untrained model's are noise. The [class] token's "
        "embedding is left out."
    ),
    "attention_distance": (
        "Each dot is one head of one layer: the pixel distance between a patch and the patches it attends to, "
        "weighted by the attention and averaged over patches and images, the analogue of a CNN's receptive field "
        "size. In a trained ViT some heads attend across most of the image already in the lowest layers while "
        "others stay local, and the distance grows with depth (paper, Fig. 7 right and Fig. 11). The dashed line "
        "is what uniform attention over all patches gives."
    ),
    "attention_rollout": (
        "Top: the input as the model sees it; bottom: the same weighted by attention rollout (Abnar and Zuidema, "
        "2020; paper, Fig. 6 and appendix D.8): the heads' attention averaged, the identity added for the "
        "residual connections, rows re-normalised and multiplied through all layers, then the output token's "
        "share of each patch, scaled to its maximum. A trained model attends to the regions that are "
        "semantically relevant for classification. Titles: the predicted class and its probability."
    ),
}
TITLES = {
    "embedding_filters": "1. Embedding filters",
    "position_similarity": "2. Position-embedding similarity",
    "attention_distance": "3. Mean attention distance",
    "attention_rollout": "4. Attention rollout",
}

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
img{max-width:100%;height:auto}.how{color:#444}.note{color:#a50;font-style:italic}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
code{background:#f4f4f4;padding:0 3px}"""


def _table(header: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def render_html(report: dict) -> str:
    """The page of a report (`run`'s dict): each figure with how to read it and its numbers, or why it is missing."""
    m = report["model"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>vitlab inspect: {html.escape(str(m['source']))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(m['name'] or 'ViT')}: <code>{html.escape(str(m['source']))}</code></h1>",
        "<p>" + html.escape(
            f"{m['num_layers']} layers, width {m['hidden_size']}, {m['num_heads']} heads, image "
            f"{m['image_size'][0]}x{m['image_size'][1]}, patches {m['patch_size'][0]}x{m['patch_size'][1]}, grid "
            f"{m['grid_size'][0]}x{m['grid_size'][1]}, classifier {m['classifier']}, {m['num_classes']} classes. "
            f"Images: {report['images']['source']}."
        ) + f" The numbers are in <code>{JSON_FILE}</code>, the arrays in <code>{ARRAYS_FILE}</code>.</p>",
    ]
    for key, title in TITLES.items():
        parts.append(f"<h2>{title}</h2><p class='how'>{html.escape(HOW_TO_READ[key])}</p>")
        if key not in report["figures"]:
            parts.append(f"<p class='note'>Not drawn: {html.escape(report['skipped'].get(key, 'no data'))}</p>")
            continue
        parts.append(f"<p><img src='{html.escape(report['figures'][key])}' alt='{html.escape(title)}'></p>")
        if key == "embedding_filters":
            e = report["embedding_filters"]
            parts.append(f"<p>{e['num_filters']} filters of shape {'x'.join(map(str, e['filter_shape']))}; the "
                         f"{len(e['explained_variance_ratio'])} components shown explain "
                         f"{100 * sum(e['explained_variance_ratio']):.1f}% of their variance.</p>")
        elif key == "position_similarity":
            s = report["position_similarity"]
            if s["neighbour_similarity"] is not None:
                parts.append(f"<p>Mean cosine similarity with the (up to 4) nearest neighbours "
                             f"{s['neighbour_similarity']:.3f}, with all other positions "
                             f"{s['mean_similarity']:.3f}.</p>")
        elif key == "attention_distance":
            rows = [[i + 1, f"{min(d):.1f}", f"{sum(d) / len(d):.1f}", f"{max(d):.1f}"]
                    for i, d in enumerate(report["mean_attention_distance"])]
            parts.append(f"<p>Pixels at {m['image_size'][0]}x{m['image_size'][1]}, over "
                         f"{report['images']['count']} images; uniform attention over all patches gives "
                         f"{report['attention_distance']['uniform_over_patches']:.1f}.</p>")
            parts.append(_table(["layer", "min over heads", "mean", "max"], rows))
        elif key == "attention_rollout":
            parts.append(f"<p>{html.escape(report['attention_rollout']['row'])}.</p>")
    if report["images"]["predictions"]:
        parts.append("<h2>Predictions</h2>")
        predictions = report["images"]["predictions"]
        labelled = "label" in predictions[0]
        rows = [[p["name"], *([p["label"]] if labelled else []), p["predicted"], f"{p['probability']:.3f}"]
                for p in predictions]
        parts.append(_table(["image", *(["label"] if labelled else []), "predicted", "probability"], rows))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------------------------


def _json(report: dict) -> str:
    """Indented JSON with each list of numbers on one line."""
    text = json.dumps(report, indent=1, allow_nan=False)
    # json.dumps breaks every list over lines; a newline cannot occur inside a JSON string, so this never
    # touches a string's text
    numbers = re.compile(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]")
    return numbers.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def run(model: nn.Module, images: Tensor | None, out_dir: str | Path, *, names: Sequence[str] | None = None,
        labels: Sequence[str] | None = None, source: str = "model", image_source: str | None = None,
        num_components: int = 28, num_overlays: int = 8, batch_size: int = 32) -> dict:
    """Write the figures, `inspect.json`, `inspect.npz` and `index.html` of `model` into `out_dir`; the report.

    `images`: uint8 (B, C, H, W) at the model's resolution, or None for the weight-only figures (1, 2).
    `names` and `labels` (true class names) annotate the images; `source` names the checkpoint.
    """
    model = unwrap(model)
    check_inspectable(model)
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p, grid = cfg.num_prefix_tokens, tuple(cfg.grid_size)
    report: dict = dict(
        model=dict(source=str(source), name=cfg.name, image_size=list(cfg.image_size),
                   patch_size=list(cfg.patch_size), grid_size=list(grid), num_layers=len(model.blocks),
                   num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, classifier=cfg.classifier,
                   num_classes=cfg.num_classes, num_prefix_tokens=p),
        images=dict(source=image_source or ("none" if images is None else f"{len(images)} images"),
                    count=0 if images is None else len(images), predictions=[]),
        figures={}, skipped={},
    )
    arrays: dict[str, np.ndarray] = {}

    # 1. Embedding filters: only when the embedding is a linear map of raw pixel patches (not a hybrid's stem).
    weight = model.patch_embed.proj.weight
    if tuple(weight.shape[1:]) == (cfg.in_chans, *cfg.patch_size):
        components, explained = embedding_pcs(weight)
        k = min(num_components, len(components))
        plot_embedding_filters(components[:k], explained[:k], out / FIGURES["embedding_filters"])
        report["figures"]["embedding_filters"] = FIGURES["embedding_filters"]
        report["embedding_filters"] = dict(num_filters=weight.shape[0], filter_shape=list(weight.shape[1:]),
                                           explained_variance_ratio=explained[:k].tolist())
        arrays.update(embedding_components=components.numpy(), embedding_explained_variance=explained.numpy())
    else:
        report["skipped"]["embedding_filters"] = (
            f"the patch embedding's filters {tuple(weight.shape[1:])} do not act on {cfg.in_chans}-channel "
            f"{cfg.patch_size[0]}x{cfg.patch_size[1]} pixel patches (a hybrid's embedding reads CNN features)")

    # 2. Position-embedding similarity.
    try:
        similarity = pos_embed_similarity(model.pos_embed, grid, p)
    except ValueError as e:  # an imported model whose embeddings are not one per grid position
        report["skipped"]["position_similarity"] = str(e)
    else:
        plot_position_similarity(similarity, out / FIGURES["position_similarity"])
        report["figures"]["position_similarity"] = FIGURES["position_similarity"]
        N = grid[0] * grid[1]
        flat = similarity.reshape(N, N)
        neighbours = (patch_distances(grid, (1, 1)) == 1).double()  # the 4-neighbourhood on the grid
        report["position_similarity"] = dict(
            neighbour_similarity=float((flat * neighbours).sum() / neighbours.sum()) if neighbours.any() else None,
            mean_similarity=float((flat.sum() - flat.diagonal().sum()) / (N * N - N)) if N > 1 else None,
        )
        arrays["position_similarity"] = similarity.numpy()

    # 3 and 4 need images.
    if images is None or len(images) == 0:
        for key in ("attention_distance", "attention_rollout"):
            report["skipped"][key] = "no images given: pass --images PATH... or --data SPEC"
    else:
        expected = (cfg.in_chans, *cfg.image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be uint8 (B, {cfg.in_chans}, {cfg.image_size[0]}, {cfg.image_size[1]}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        with eval_mode(model):
            stats = attention_statistics(model, images, batch_size=batch_size, keep=num_overlays)
        distance = stats["mean_attention_distance"]  # (L, H)
        uniform = float(patch_distances(grid, pixel_pitch(cfg)).mean())
        plot_attention_distance(distance, out / FIGURES["attention_distance"], uniform)
        report["figures"]["attention_distance"] = FIGURES["attention_distance"]
        report["mean_attention_distance"] = distance.tolist()
        report["attention_distance"] = dict(unit="pixels", uniform_over_patches=uniform)

        predictions = []
        if stats["logits"] is not None:
            probs = stats["logits"].softmax(-1)
            top_p, top_i = probs.max(-1)
            class_names = cfg.class_names or [f"class {i}" for i in range(cfg.num_classes)]
            for k, (i, prob) in enumerate(zip(top_i.tolist(), top_p.tolist())):
                entry = dict(name=names[k], predicted=class_names[i], class_index=i, probability=prob)
                if labels is not None:
                    entry["label"] = labels[k]
                predictions.append(entry)
        report["images"]["predictions"] = predictions

        arrays["mean_attention_distance"] = distance.numpy()

        masks = stats["rollout"]  # (n, h, w), the first n images
        n = len(masks)
        if n:
            titles = [f"{names[k]}\n{predictions[k]['predicted']} ({predictions[k]['probability']:.2f})"
                      if predictions else names[k] for k in range(n)]
            row = ("the [class] token's row" if p else "the mean over all query rows: this model pools its "
                   "tokens (classifier gap) and has no [class] token")
            plot_rollout(images[:n], masks, titles, out / FIGURES["attention_rollout"],
                         f"Attention rollout ({'[class] token' if p else 'mean over tokens, gap model'})")
            report["figures"]["attention_rollout"] = FIGURES["attention_rollout"]
            report["attention_rollout"] = dict(row=f"Rollout of {row}", images=names[:n])
            arrays["rollout"] = masks.numpy()
        else:
            report["skipped"]["attention_rollout"] = "no overlays asked for (num_overlays 0)"

    for key, name in FIGURES.items():  # a figure of an earlier run into the same directory that this one lacks
        if key not in report["figures"]:
            (out / name).unlink(missing_ok=True)

    def write_arrays(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out / ARRAYS_FILE, write_arrays)
    atomic_write_text(out / JSON_FILE, _json(report))
    atomic_write_text(out / PAGE_FILE, render_html(report))
    return report


# --------------------------------------------------------------------------------------------------------------
# Images to inspect
# --------------------------------------------------------------------------------------------------------------


def image_files(paths: Sequence[str], cfg) -> Tensor:
    """Image files decoded and resized as evaluation sees them: uint8 (B, C, H, W) at the model's resolution."""
    transform = eval_transform(cfg.image_size, cfg.in_chans)
    return torch.stack([transform(decode_image(path, cfg.in_chans)) for path in paths])


def data_images(spec: str, cfg, split: str | None, count: int) -> tuple[Tensor, list[str], list[str], str]:
    """The first `count` images of a --data spec's evaluation split (its training images when it has none)."""
    splits = data.build(spec, image_size=cfg.image_size, in_chans=cfg.in_chans, split=split,
                        train_transform=TrainAug(crop="none", flip=False))  # no augmentation if train is used
    dataset, split_name = splits.eval, splits.eval_name
    if dataset is None:
        dataset, split_name = splits.train, "train"
    loader = data.make_loader(dataset, min(count, 64), shuffle=False, seed=0, epoch=0, even=False)
    images, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images.append(batch[0])
        labels += batch[1].tolist()
        if len(labels) >= count:
            break
    if not labels:
        raise DataError(f"{spec}: the {split_name} split holds no image")
    images_t = torch.cat(images)[:count]
    labels = labels[:count]
    names = [f"{split_name} #{i}" for i in range(len(labels))]
    label_names = [splits.class_names[j] if 0 <= j < len(splits.class_names) else str(j) for j in labels]
    return images_t, names, label_names, f"the first {len(labels)} images of {spec}'s {split_name} split"
