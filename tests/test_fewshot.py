"""Few-shot linear evaluation: the closed-form ridge against direct solutions, the shots drawn per seed, the frozen
features, and `vitlab fewshot` on tests/tiny.py's set."""

import json

import numpy as np
import pytest
import torch

from tiny import TINY, tiny_world, write_fashion_mnist, fashion_dir, world  # noqa: F401 (fixtures)
from vitlab import cli, data
from vitlab.evaluate import (
    FEWSHOT_L2_REG,
    features,
    fewshot,
    fewshot_lsr,
    ridge_solve,
    shot_indices,
    shot_order,
)
from vitlab.model import VisionTransformer
from vitlab.train import TrainConfig
from vitlab.weights import save_checkpoint


@pytest.mark.parametrize("n,d", [(40, 7), (6, 30)])  # more images than dimensions, and fewer
def test_ridge_equals_least_squares_of_the_augmented_system(n, d):
    rng = np.random.default_rng(0)
    x, y, l2 = rng.standard_normal((n, d)), rng.standard_normal((n, 3)), 2.5
    # ‖xW - y‖² + l2‖W‖² is the plain least squares of [x; √l2 I] W = [y; 0]
    direct = np.linalg.lstsq(np.vstack([x, np.sqrt(l2) * np.eye(d)]), np.vstack([y, np.zeros((d, 3))]), rcond=None)[0]
    np.testing.assert_allclose(ridge_solve(x, y, l2), direct, rtol=1e-8, atol=1e-10)
    normal = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)  # the d x d normal equations, whichever n
    np.testing.assert_allclose(ridge_solve(x, y, l2), normal, rtol=1e-8, atol=1e-10)


def test_fewshot_lsr_is_big_vision_s_whitened_ridge_with_a_bias_column():
    rng = np.random.default_rng(1)
    K, d = 4, 12
    x_train, y_train = rng.standard_normal((K * 5, d)) * 3 + 1, np.repeat(np.arange(K), 5)
    x_test = rng.standard_normal((30, d)) * 3 + 1
    # big_vision's computation written out (evaluators/fewshot_lsr.py): eigendecomposition of the smaller Gram
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    X = np.pad((x_train - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    Y = 2.0 * np.eye(K)[y_train] - 1.0
    eigs, q = np.linalg.eigh(X.T @ X)  # N = 20 >= D = 13: big_vision's case (A)
    w = (q * (1.0 / (eigs + FEWSHOT_L2_REG))) @ (q.T @ (X.T @ Y))
    T = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    np.testing.assert_array_equal(fewshot_lsr(x_train, y_train, x_test, K), (T @ w).argmax(1))
    # separable classes are told apart from one shot each at a small regulariser
    centres = rng.standard_normal((K, d)) * 10
    test = np.repeat(np.arange(K), 10)
    assert (fewshot_lsr(centres, np.arange(K), centres[test] + rng.standard_normal((40, d)), K, 1e-3) == test).all()


def test_shots_are_balanced_and_reproducible_per_seed():
    labels = np.random.default_rng(2).integers(0, 5, 300)
    order = shot_order(labels, 5, seed=3)
    five = shot_indices(order, 5)
    assert np.bincount(labels[five], minlength=5).tolist() == [5] * 5 and len(set(five.tolist())) == 25
    assert np.array_equal(five, shot_indices(shot_order(labels, 5, seed=3), 5))  # the same seed, the same shots
    assert not np.array_equal(five, shot_indices(shot_order(labels, 5, seed=4), 5))
    one = shot_indices(order, 1)
    assert set(one.tolist()) <= set(five.tolist())  # for one seed the 1-shot images are among the 5-shot ones
    with pytest.raises(data.DataError, match="200-shot needs 200 training images of every class; class 0 has"):
        shot_indices(order, 200)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fashion_dir):
    """tests/tiny.py's model with random weights and a pre-logits layer, saved."""
    cfg = TrainConfig(**TINY).model_config(num_classes=10).replace(representation_size=24)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    torch.nn.init.normal_(model.head.weight)
    return save_checkpoint(model, tmp_path_factory.mktemp("fewshot") / "ck"), model.eval()


def test_features_are_the_pre_logits_representation(checkpoint):
    _, model = checkpoint
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=None)
    x, y = features(model, splits.train, batch_size=50, device=torch.device("cpu"), indices=[7, 3, 100])
    images = torch.stack([splits.train[i][0] for i in (7, 3, 100)])
    with torch.no_grad():
        expected = model.pre_logits(model.forward_features(data.normalize(images, model.cfg.mean, model.cfg.std))[:, 0])
    assert x.shape == (3, 24) and y.tolist() == [splits.train[i][1] for i in (7, 3, 100)]
    np.testing.assert_allclose(x, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_fewshot_computes_only_the_drawn_training_features(checkpoint):
    _, model = checkpoint
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=None)
    result = fewshot(model, splits.train, splits.eval, 10, shots=[1, 2], seeds=[0, 1], batch_size=64)
    assert result["featurised"] <= 2 * 10 * 2 and result["eval_images"] == 128 and result["feature_dim"] == 24
    for k, r in result["results"].items():
        assert len(r["accuracy"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accuracy"]))
        assert r["std"] == pytest.approx(np.std(r["accuracy"], ddof=1))


def test_vitlab_fewshot_prints_a_table_and_writes_json(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    argv = ["fewshot", str(ckpt), "--data", "fashion-mnist", "--shots", "1,5,10", "--seeds", "3",
            "--json", str(tmp_path / "fewshot.json")]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "24-dim pre-logits features" in lines[0] and "l2 reg 1024, 3 seeds" in lines[0]
    assert lines[1].split() == ["shots", "accuracy", "std"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "5", "10"]
    record = json.loads((tmp_path / "fewshot.json").read_text())
    assert set(record["results"]) == {"1", "5", "10"} and record["l2_reg"] == 1024 and record["seeds"] == [0, 1, 2]
    assert f"{record['results']['10']['mean']:.4f}" == lines[-1].split()[1]
    assert all(0 <= r["mean"] <= 1 for r in record["results"].values())

    assert cli.main(["fewshot", str(ckpt), "--data", "fashion-mnist", "--shots", "1000"]) == 2
    err = capsys.readouterr().err
    assert "1000-shot needs 1000 training images of every class" in err and len(err.strip().splitlines()) == 1
