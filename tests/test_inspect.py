"""`vitlab inspect`: the mathematics on cases with known answers, the page, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import official
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from vitlab import cli, runtime
from vitlab import inspect as vi
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.weights import save_checkpoint

torch.set_num_threads(1)  # a busy 2-core machine: tiny tensors gain nothing from more


def tiny_model(**fields) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(image_size=(12, 16), patch_size=(3, 2), hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
               num_classes=3, class_names=("cat", "dog", "eel"))
    cfg.update(fields)
    return VisionTransformer(ViTConfig(**cfg)).eval()


def grid_distances(grid, pitch) -> np.ndarray:
    """Pixel distances between patch centres by a double loop over positions, independently of vitlab."""
    (h, w), (ph, pw) = grid, pitch
    cells = list(itertools.product(range(h), range(w)))  # row-major, as the patch sequence
    out = np.zeros((len(cells), len(cells)))
    for a, (i, j) in enumerate(cells):
        for b, (k, l) in enumerate(cells):
            out[a, b] = math.hypot((i - k) * ph, (j - l) * pw)
    return out


# --------------------------------------------------------------------------------------------------------------
# Mean attention distance and rollout
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,pitch", [((4, 4), (16, 16)), ((3, 5), (4, 2)), ((1, 6), (7, 3))])
def test_patch_distances_are_pixel_distances_between_centres(grid, pitch):
    d = vi.patch_distances(grid, pitch)
    np.testing.assert_allclose(d.numpy(), grid_distances(grid, pitch), rtol=1e-12, atol=1e-12)
    rows, cols = np.meshgrid(np.arange(grid[0]) * pitch[0] + pitch[0] / 2, np.arange(grid[1]) * pitch[1] + pitch[1] / 2,
                             indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], 1)
    np.testing.assert_allclose(d.numpy(), cdist(centres, centres), atol=1e-9)
    assert (d.diagonal() == 0).all()


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_identity_attention_has_distance_zero_and_rollout_the_identity(num_prefix):
    grid = (3, 4)
    T = grid[0] * grid[1] + num_prefix
    attn = torch.eye(T, dtype=torch.float64).expand(2, 3, T, T)
    distance = vi.mean_attention_distance(attn, vi.patch_distances(grid, (5, 2)), num_prefix)
    assert distance.shape == (3,) and (distance == 0).all()
    rollout = vi.attention_rollout([attn] * 4)
    torch.testing.assert_close(rollout, torch.eye(T, dtype=torch.float64).expand(2, T, T))


@pytest.mark.parametrize("grid,pitch", [((4, 4), (4, 4)), ((3, 5), (4, 2))])
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_uniform_attention_gives_the_mean_pairwise_distance(grid, pitch, num_prefix):
    N = grid[0] * grid[1]
    T = N + num_prefix
    attn = torch.full((2, 3, T, T), 1.0 / T, dtype=torch.float64)
    distance = vi.mean_attention_distance(attn, vi.patch_distances(grid, pitch), num_prefix)
    # Each patch key gets 1/T, the [class] key keeps its share: (N / T) x the mean over all N x N patch pairs.
    expected = N / T * grid_distances(grid, pitch).mean()
    np.testing.assert_allclose(distance.numpy(), np.full(3, expected), rtol=1e-12)


def test_attending_one_row_down_is_one_patch_height():
    grid, pitch = (2, 3), (5.0, 2.0)  # two rows: "one row down, wrapping" is always exactly one row away
    N = 6
    attn = torch.zeros(1, 2, N + 1, N + 1)
    attn[:, :, 0, 0] = 1  # the [class] row is left out whatever it holds
    for q in range(N):
        i, j = divmod(q, 3)
        attn[:, 0, q + 1, ((i + 1) % 2) * 3 + j + 1] = 1  # head 0: the patch below (or above)
        attn[:, 1, q + 1, i * 3 + (j + 1) % 3 + 1] = 0.5  # head 1: half to the next column (wrapping) ...
        attn[:, 1, q + 1, 0] = 0.5  # ... half to [class], which counts distance 0 and is not re-normalised away
    distance = vi.mean_attention_distance(attn, vi.patch_distances(grid, pitch), 1)
    expected_head1 = 0.5 * (2 * 2.0 + 4.0) / 3  # columns 0->1, 1->2: one patch width; 2->0: two
    torch.testing.assert_close(distance, torch.tensor([5.0, expected_head1]))


def test_rollout_is_the_product_of_the_residual_averaged_maps():
    torch.manual_seed(1)
    T = 7
    maps = [torch.randn(2, 3, T, T, dtype=torch.float64).softmax(-1) for _ in range(3)]
    rollout = vi.attention_rollout(maps)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, T, dtype=torch.float64))
    eye = torch.eye(T, dtype=torch.float64)
    a = [(m.mean(1) + eye) / 2 for m in maps]  # rows of the head average sum to 1, so (A + I) / 2 already does
    torch.testing.assert_close(rollout, a[2] @ a[1] @ a[0])
    grid = vi.rollout_to_grid(rollout, (2, 3), 1)
    torch.testing.assert_close(grid, rollout[:, 0, 1:].reshape(2, 2, 3))
    gap = vi.rollout_to_grid(rollout[:, 1:, 1:], (2, 3), 0)  # no [class] token: the mean over query rows
    torch.testing.assert_close(gap, rollout[:, 1:, 1:].mean(1).reshape(2, 2, 3))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_layer_by_layer_matches_the_model(classifier):
    """The block-by-block run gives the model's logits, and its distances are those of the model's own maps."""
    model = tiny_model(classifier=classifier, num_layers=3)
    images = torch.randint(0, 256, (5, 3, 12, 16), dtype=torch.uint8)
    stats = vi.attention_statistics(model, images, batch_size=2, keep=3)
    x = runtime.normalize(images, model.cfg.mean, model.cfg.std)
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
    torch.testing.assert_close(stats["logits"], logits)
    d = vi.patch_distances(model.cfg.grid_size, model.cfg.patch_size).float()
    p = model.cfg.num_prefix_tokens
    expected = torch.stack([vi.mean_attention_distance(maps[i], d, p) for i in range(3)])
    torch.testing.assert_close(stats["mean_attention_distance"].float(), expected)
    rollout = vi.rollout_to_grid(vi.attention_rollout([maps[i][:3] for i in range(3)]), model.cfg.grid_size, p)
    torch.testing.assert_close(stats["rollout"], rollout)


# --------------------------------------------------------------------------------------------------------------
# Position embeddings and embedding filters
# --------------------------------------------------------------------------------------------------------------


def sinusoid_pos_embed(grid, num_prefix=1) -> torch.Tensor:
    """(1, prefix + h*w, D): sines and cosines of row and column at frequencies low enough (f·Δ < π) for the
    similarity to fall monotonically with the distance along a row or a column."""
    h, w = grid
    freqs = torch.linspace(0.05, 0.35, 8, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    r, c = r.flatten()[:, None] * freqs, c.flatten()[:, None] * freqs
    pe = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    prefix = torch.full((num_prefix, pe.shape[1]), 3.0, dtype=torch.float64)  # far from all: must be left out
    return torch.cat([prefix, pe])[None]


@pytest.mark.parametrize("grid,num_prefix", [((5, 5), 1), ((3, 7), 1), ((4, 6), 0)])
def test_position_similarity_of_2d_coordinates(grid, num_prefix):
    h, w = grid
    sim = vi.pos_embed_similarity(sinusoid_pos_embed(grid, num_prefix), grid, num_prefix)
    assert sim.shape == (h, w, h, w)
    for i, j in itertools.product(range(h), range(w)):
        tile = sim[i, j]
        assert tile[i, j] == pytest.approx(1.0)
        assert tile.flatten().argmax() == i * w + j  # most similar to itself
        along_row = [tile[i, j + k] for k in range(w - j)]  # moving away from itself along its row ...
        along_col = [tile[i + k, j] for k in range(h - i)]  # ... and along its column
        assert all(a > b for a, b in itertools.pairwise(along_row))
        assert all(a > b for a, b in itertools.pairwise(along_col))
    torch.testing.assert_close(sim, sim.permute(2, 3, 0, 1))  # symmetric


def test_position_similarity_rejects_a_grid_it_does_not_fill():
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        vi.pos_embed_similarity(torch.randn(1, 10, 4), (3, 3), 0)


@pytest.mark.parametrize("shape", [(32, 3, 4, 4), (40, 1, 3, 5), (5, 3, 4, 2)])
def test_principal_components_are_orthonormal_and_ordered(shape):
    torch.manual_seed(2)
    weight = torch.randn(*shape) * torch.linspace(3, 0.1, math.prod(shape[1:])).reshape(shape[1:])
    components, explained = vi.embedding_pcs(weight)
    K = min(shape[0], math.prod(shape[1:]))
    assert components.shape == (K, *shape[1:]) and explained.shape == (K,)
    flat = components.reshape(K, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(K, dtype=torch.float64))
    assert (explained[:-1] >= explained[1:]).all() and (explained >= 0).all()
    assert float(explained.sum()) <= 1 + 1e-9
    # the components span the centred filters, so their variances add up to all of it
    assert float(explained.sum()) == pytest.approx(1.0)


def test_principal_components_find_the_directions_of_a_known_spread():
    torch.manual_seed(3)
    u, v = torch.linalg.qr(torch.randn(48, 2, dtype=torch.float64))[0].T  # two orthonormal patch directions
    ab = torch.randn(200, 2, dtype=torch.float64)
    ab = torch.linalg.qr(ab - ab.mean(0))[0]  # two centred, uncorrelated unit-norm spreads over the filters
    a, b = 3 * ab[:, :1], ab[:, 1:]  # variances 9 : 1
    weight = (a * u + b * v + 5.0).reshape(200, 3, 4, 4)  # an offset the centring removes
    components, explained = vi.embedding_pcs(weight)
    flat = components.reshape(len(components), -1)
    assert abs(float(flat[0] @ u)) == pytest.approx(1.0, abs=1e-9)
    assert abs(float(flat[1] @ v)) == pytest.approx(1.0, abs=1e-9)
    assert explained[:2].tolist() == pytest.approx([0.9, 0.1], abs=1e-9)
    assert float(explained[2:].abs().max()) < 1e-20
    assert float(flat[0][flat[0].abs().argmax()]) > 0  # the sign fixed: the largest entry positive


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def page_images(out) -> list[str]:
    parser = _Images()
    parser.feed((out / "index.html").read_text())
    return parser.src


def assert_page_shows_every_figure(out, expected: set[str]):
    src = page_images(out)
    assert set(src) == expected and len(src) == len(expected)
    assert all((out / s).is_file() for s in src)
    assert {p.name for p in out.glob("*.png")} == expected  # every PNG written is on the page


def test_the_page_references_every_figure_and_only_those(tmp_path):
    model = tiny_model()
    images = torch.randint(0, 256, (3, 3, 12, 16), dtype=torch.uint8)
    report = vi.run(model, images, tmp_path, names=["a", "b", "c"], num_components=5, num_overlays=2)
    assert_page_shows_every_figure(tmp_path, set(vi.FIGURES.values()))
    assert set(report["figures"]) == set(vi.FIGURES) and report["skipped"] == {}
    saved = json.loads((tmp_path / "inspect.json").read_text())
    assert np.array(saved["mean_attention_distance"]).shape == (2, 2)  # (layers, heads)
    assert len(saved["embedding_filters"]["explained_variance_ratio"]) == 5
    assert [p["predicted"] for p in saved["images"]["predictions"]] == ["cat"] * 3  # zero head: ties, the first
    with np.load(tmp_path / "inspect.npz") as arrays:
        assert arrays["rollout"].shape == (2, 4, 8) and arrays["position_similarity"].shape == (4, 8, 4, 8)

    # Again without images, into the same directory: the weight-only figures, a note for the others, and the
    # attention figures of the first run gone rather than left beside a page that does not show them.
    report = vi.run(model, None, tmp_path)
    assert_page_shows_every_figure(tmp_path, {vi.FIGURES["embedding_filters"], vi.FIGURES["position_similarity"]})
    assert set(report["skipped"]) == {"attention_distance", "attention_rollout"}
    page = (tmp_path / "index.html").read_text()
    assert page.count("Not drawn: no images given") == 2
    assert "mean_attention_distance" not in json.loads((tmp_path / "inspect.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def write_pngs(directory, sizes, channels=3, seed=0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k, (h, w) in enumerate(sizes):
        shape = (h, w, 3) if channels == 3 else (h, w)
        paths.append(str(directory / f"img{k}.png"))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.slow
def test_inspect_a_checkpoint_with_image_files(tmp_path):
    """As a user runs it: a non-square model with non-square patches, images of other sizes and shapes."""
    ckpt = save_checkpoint(tiny_model(num_layers=3, num_heads=4), tmp_path / "ckpt")
    paths = write_pngs(tmp_path / "images", [(20, 20), (9, 31), (40, 13)])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "vitlab", "inspect", str(ckpt), "--images", *paths,
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"open {out / 'index.html'}" in result.stdout and "mean attention distance per layer" in result.stdout
    assert_page_shows_every_figure(out, set(vi.FIGURES.values()))
    report = json.loads((out / "inspect.json").read_text())
    distance = np.array(report["mean_attention_distance"])
    assert distance.shape == (3, 4)
    # between 0 and the largest patch-centre distance of a 4x8 grid of 3x2-pixel patches
    assert (distance > 0).all() and (distance < math.hypot(3 * 3, 7 * 2)).all()
    assert [p["name"] for p in report["images"]["predictions"]] == ["img0.png", "img1.png", "img2.png"]


def test_inspect_an_official_npz_on_a_data_folder(tmp_path, capsys):
    """A gap model as vit_jax wrote it (no [class] token, a 3x5 grid), grey images from folder:PATH's val split."""
    npz = official.path("vit_jax_vit_gap")
    for split, seed in (("train", 1), ("val", 2)):
        for k, name in enumerate(("ant", "bee")):
            write_pngs(tmp_path / "folder" / split / name, [(8, 16), (10, 10)], channels=1, seed=seed + 10 * k)
    out = tmp_path / "out"
    argv = ["inspect", str(npz), "--data", f"folder:{tmp_path / 'folder'}", "--num-images", "3", "--out", str(out),
            "--num-components", "6", "--source-grid", "3x5"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert_page_shows_every_figure(out, set(vi.FIGURES.values()))
    report = json.loads((out / "inspect.json").read_text())
    assert report["model"]["classifier"] == "gap" and report["model"]["grid_size"] == [3, 5]
    assert report["images"]["count"] == 3 and "val split" in report["images"]["source"]
    assert [p["label"] for p in report["images"]["predictions"]] == ["ant", "ant", "bee"]
    assert np.array(report["mean_attention_distance"]).shape == (2, 4)
    assert "mean over all query rows" in report["attention_rollout"]["row"]
    assert "no [class] token" in (out / "index.html").read_text()


def test_inspect_without_images_draws_the_weight_figures(tmp_path, capsys):
    npz = official.path("vit_jax_vit")
    assert cli.main(["inspect", str(npz), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "skipped mean attention distance: no images given" in printed
    assert_page_shows_every_figure(tmp_path / "out", {"embedding_filters.png", "position_similarity.png"})


@pytest.mark.parametrize("case,fragment", [
    ("missing", "missing.npz: no such file"),
    ("junk", "junk.npz: not an .npz archive"),
    ("bad image", "cannot decode image"),
])
def test_errors_are_one_line_naming_the_file(tmp_path, capsys, case, fragment):
    ckpt = official.path("vit_jax_vit")
    images = write_pngs(tmp_path / "images", [(16, 16)])
    if case == "missing":
        ckpt = tmp_path / "missing.npz"
    elif case == "junk":
        ckpt = tmp_path / "junk.npz"
        ckpt.write_bytes(b"junk")
    else:
        (tmp_path / "bad.png").write_bytes(b"not a png")
        images.append(str(tmp_path / "bad.png"))
    assert cli.main(["inspect", str(ckpt), "--images", *images, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("vitlab inspect: error: ") and fragment in err
    if case == "bad image":
        assert "bad.png" in err
