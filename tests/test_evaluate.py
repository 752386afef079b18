"""Evaluation: accuracy and prediction on a checkpoint trained here (tests/tiny.py's set and model), ImageNet-ReaL,
and few-shot linear evaluation (the closed-form ridge against direct solutions, the shots drawn per seed, the frozen
features, `vitlab fewshot`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import randomise
from datasets import write_cls_shards
from PIL import Image
from tiny import TINY, blocks, fashion_dir, tiny_world, world  # noqa: F401 (fixtures)

import vitlab
from vitlab import cli, common, data, runtime
from vitlab.config import TrainConfig
from vitlab.evaluate import (
    FEWSHOT_L2_REG,
    Classification,
    evaluate,
    features,
    fewshot,
    fewshot_lsr,
    predict,
    read_real_labels,
    real_accuracy,
    ridge_solve,
    shot_indices,
    shot_order,
    tta_logits,
)
from vitlab.images import TrainAug, eval_transform
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.train import train
from vitlab.weights import load_model, save_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, fashion_dir):
    """A trained tiny checkpoint and the test accuracy its training run reported."""
    out = tmp_path_factory.mktemp("eval") / "run"
    with tiny_world(fashion_dir):
        result = train(TrainConfig(**TINY, epochs=3, out=str(out)))
    return out, result["top1"]


def test_evaluate_counts_top1_and_top5_hits(run):
    out, _ = run
    model = load_model(out)
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=TrainAug())
    loader = data.make_loader(splits.eval, 50, shuffle=False, seed=0, epoch=0, even=False)
    result = evaluate(model, loader, torch.device("cpu"))

    # the same numbers, computed directly from the raw test images
    images, labels = blocks(128, seed=1)
    x = eval_transform((16, 16), 1)(torch.from_numpy(images)[:, None])
    with torch.no_grad():
        logits = model(runtime.normalize(x, model.cfg.mean, model.cfg.std))
    labels = torch.from_numpy(labels)
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    assert result["n"] == 128
    assert result["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["top5"] == pytest.approx(top5) and result["top5"] >= result["top1"]
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert not model.training  # evaluate leaves the mode as it found it (load_model gives eval mode)


def test_the_evaluator_equals_a_hand_computation_and_restores_training_mode(run):
    out, _ = run
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=TrainAug())
    evaluator = Classification(splits.eval, "test", batch_size=48, device=torch.device("cpu"), precision="fp32")
    model = load_model(out).train()
    result = evaluator.run(model)
    assert model.training
    images = torch.stack([splits.eval[i][0] for i in range(len(splits.eval))])  # all 128, by hand
    labels = torch.tensor([splits.eval[i][1] for i in range(len(splits.eval))])
    with torch.no_grad():
        logits = model.eval()(runtime.normalize(images, model.cfg.mean, model.cfg.std))
    top5 = logits.topk(5, -1).indices
    assert result["n"] == 128
    assert result["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(), abs=1e-9)
    assert result["top5"] == pytest.approx((top5 == labels[:, None]).any(-1).float().mean().item(), abs=1e-9)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_flip_tta_classifies_by_the_mean_of_an_image_s_and_its_mirror_s_probabilities(run):
    out, _ = run
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=TrainAug())
    evaluator = Classification(splits.eval, "test", batch_size=48, device=torch.device("cpu"), precision="fp32",
                               tta="flip")
    model = load_model(out)
    result = evaluator.run(model)
    images = torch.stack([splits.eval[i][0] for i in range(len(splits.eval))])  # all 128, by hand
    labels = torch.tensor([splits.eval[i][1] for i in range(len(splits.eval))])
    with torch.no_grad():
        probs = [model(runtime.normalize(x, model.cfg.mean, model.cfg.std)).softmax(-1)
                 for x in (images, images.flip(-1))]
    mean = (probs[0] + probs[1]) / 2
    assert not torch.equal(probs[0].argmax(-1), probs[1].argmax(-1))  # the mirror images are classified otherwise
    assert result["n"] == 128
    assert result["top1"] == pytest.approx((mean.argmax(-1) == labels).float().mean().item(), abs=1e-9)
    assert result["loss"] == pytest.approx(F.nll_loss(mean.log(), labels).item(), rel=1e-5)
    with torch.no_grad():
        logits = tta_logits(model, images, "fp32", "flip")
    torch.testing.assert_close(logits.softmax(-1), mean, rtol=1e-5, atol=1e-6)  # logits of the mean distribution
    torch.testing.assert_close(logits, logits.log_softmax(-1), rtol=0, atol=1e-5)


def test_eval_uses_a_run_s_own_tta_unless_told(run, tmp_path, capsys):
    """A run that evaluated with --tta flip is evaluated so again by default; --tta none or flip overrides."""
    out, _ = run
    flipped = tmp_path / "run"
    shutil.copytree(out, flipped)
    config = json.loads((flipped / "train_config.json").read_text())
    assert config["tta"] == "none"
    (flipped / "train_config.json").write_text(json.dumps(dict(config, tta="flip")))
    results = {}
    for name, ckpt, flags in (("plain", out, []), ("run's", flipped, []), ("none", flipped, ["--tta", "none"]),
                              ("flip", out, ["--tta", "flip"])):
        assert cli.main(["eval", str(ckpt), "--data", "fashion-mnist", "--json", str(tmp_path / "e.json"),
                         *flags]) == 0
        results[name] = json.loads((tmp_path / "e.json").read_text())
        assert ("and their mirror images" in capsys.readouterr().out) == (results[name]["tta"] == "flip")
    assert [results[n]["tta"] for n in results] == ["none", "flip", "none", "flip"]
    assert results["plain"]["loss"] == results["none"]["loss"] != results["flip"]["loss"] == results["run's"]["loss"]
    (flipped / "train_config.json").write_text(json.dumps(dict(config, tta="mirror")))
    assert cli.main(["eval", str(flipped), "--data", "fashion-mnist"]) != 0
    err = capsys.readouterr().err
    assert "has tta 'mirror', not none or flip" in err and "Traceback" not in err


def test_eval_prints_top1_and_top5_and_writes_json(run, tmp_path, capsys):
    out, accuracy = run
    assert cli.main(["eval", str(out), "--data", "fashion-mnist", "--json", str(tmp_path / "eval.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    top1 = next(line for line in lines if line.startswith("top1: "))
    assert top1 == f"top1: {accuracy:.4f}"  # what the training run reported at its end
    assert any(line.startswith("top5: ") for line in lines)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["split"] == "test" and record["n"] == 128 and record["top1"] == pytest.approx(accuracy)
    assert set(record) >= {"top1", "top5", "loss", "n"}


def test_eval_compiled_scores_as_eager(run, tmp_path):
    out, _ = run
    for flags, name in (([], "eager.json"), (["--compile"], "compiled.json")):
        assert cli.main(["eval", str(out), "--data", "fashion-mnist", "--json", str(tmp_path / name), *flags]) == 0
    eager, compiled = (json.loads((tmp_path / name).read_text()) for name in ("eager.json", "compiled.json"))
    assert compiled["n"] == eager["n"] == 128
    assert compiled["top1"] == eager["top1"] and compiled["loss"] == pytest.approx(eager["loss"], abs=2e-3)


def test_eval_on_a_val_split_and_wrong_data(run, capsys):
    out, _ = run
    assert cli.main(["eval", str(out), "--data", "fashion-mnist", "--split", "val", "--val-split", "0.25"]) == 0
    assert "val: 128 images" in capsys.readouterr().out
    assert cli.main(["eval", str(out), "--data", "fashion-mnist", "--split", "val"]) == 2
    assert "no val split" in capsys.readouterr().err


def test_predict_prints_class_names_with_probabilities(run, tmp_path, capsys):
    out, _ = run
    images, labels = blocks(3, seed=5)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(image).save(paths[-1])
    assert cli.main(["predict", str(out), *paths, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::4] == paths
    model = load_model(out)
    names = model.cfg.class_names
    for block in (lines[1:4], lines[5:8], lines[9:12]):
        pairs = [line.rsplit(None, 1) for line in block]
        assert all(name.strip() in names for name, _ in pairs)
        probs = [float(p) for _, p in pairs]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001

    # predict sees a PNG as evaluation sees the same pixels from the dataset
    ranked = predict(model, paths, k=10, precision="fp32")
    x = eval_transform((16, 16), 1)(torch.from_numpy(images)[:, None])
    with torch.no_grad():
        probs = model(runtime.normalize(x, model.cfg.mean, model.cfg.std)).softmax(-1)
    for row, expected in zip(ranked, probs):
        got = torch.tensor([p for _, p in sorted(row, key=lambda pair: names.index(pair[0]))])
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make", [
    lambda d: d / "missing.png",
    lambda d: (d / "junk.png").write_bytes(b"not an image") and d / "junk.png",
])
def test_predict_on_a_bad_image_is_one_line_naming_it(run, tmp_path, capsys, make):
    out, _ = run
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good)
    bad = make(tmp_path)
    assert cli.main(["predict", str(out), str(good), str(bad)]) == 1  # the good one predicted, the exit code says
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == str(good) and len(captured.out.splitlines()) == 6
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in captured.err
    assert err[0].startswith("vitlab predict: error: ") and str(bad) in err[0] and err[0].count(str(bad)) == 1


def test_real_accuracy_on_a_hand_made_case():
    predictions = [1, 2, 3, 0, 4]
    real = [[1], [0, 2], [], [5], [4, 1]]  # hit, hit, left out, miss, hit
    assert real_accuracy(predictions, real) == (pytest.approx(3 / 4), 4)
    assert math.isnan(real_accuracy([0], [[]])[0])


def test_eval_reports_real_accuracy_in_sorted_file_name_order(tmp_path, capsys):
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    files = {"train/a/t0.png": 0, "train/b/t1.png": 1,  # the val images: class folders, names out of order
             "val/a/ILSVRC2012_val_00000003.png": 0, "val/a/ILSVRC2012_val_00000001.png": 0,
             "val/b/ILSVRC2012_val_00000002.png": 1, "val/b/ILSVRC2012_val_00000004.png": 1}
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name)
    model = randomise(VisionTransformer(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_layers=1,
                                                  num_heads=2, mlp_dim=16, num_classes=2)), seed=10)
    ckpt = save_checkpoint(model, tmp_path / "ck")
    splits = data.build(f"folder:{root}", image_size=(8, 8), in_chans=3, train_transform=TrainAug())
    images = torch.stack([image for image, _ in (splits.eval[i] for i in range(4))])
    with torch.no_grad():  # dataset order: a/..01, a/..03, b/..02, b/..04
        predicted = model(runtime.normalize(images, model.cfg.mean, model.cfg.std)).argmax(-1).tolist()
    real_sorted = [[predicted[0]], [1 - predicted[2]], [predicted[1], 1 - predicted[1]], []]  # files 1, 2, 3, 4
    (tmp_path / "real.json").write_text(json.dumps(real_sorted))
    in_dataset_order = [real_sorted[0], real_sorted[2], real_sorted[1], []]
    assert read_real_labels(tmp_path / "real.json", splits.eval, 2) == in_dataset_order
    assert cli.main(["eval", str(ckpt), "--data", f"folder:{root}", "--real-labels", str(tmp_path / "real.json"),
                     "--json", str(tmp_path / "eval.json")]) == 0
    assert "ReaL top1: 0.6667 (3 images with ReaL labels)" in capsys.readouterr().out  # 1 hit, 1 miss, 1 hit
    assert json.loads((tmp_path / "eval.json").read_text())["real_n"] == 3
    (tmp_path / "short.json").write_text("[[0]]")
    assert cli.main(["eval", str(ckpt), "--data", f"folder:{root}", "--real-labels", str(tmp_path / "short.json")]) == 2
    assert "has 1 entries, the evaluation split 4 images" in capsys.readouterr().err


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
    with pytest.raises(common.DataError, match="200-shot needs 200 training images of every class; class 0 has"):
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
    x, y = features(model, splits.train, batch_size=50, indices=[7, 3, 100])
    images = torch.stack([splits.train[i][0] for i in (7, 3, 100)])
    with torch.no_grad():
        expected = model.pre_logits(model.forward_features(runtime.normalize(images, model.cfg.mean, model.cfg.std))[:, 0])
    assert x.shape == (3, 24) and y.tolist() == [splits.train[i][1] for i in (7, 3, 100)]
    np.testing.assert_allclose(x, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_fewshot_computes_only_the_drawn_training_features_and_scores_them_as_a_direct_solve(checkpoint):
    _, model = checkpoint
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=None)
    result = fewshot(model, splits.train, splits.eval, 10, shots=[1, 2], seeds=[0, 1], batch_size=64)
    assert result["featurised"] <= 2 * 10 * 2 and result["eval_images"] == 128 and result["feature_dim"] == 24
    # each accuracy, recomputed from scratch: the drawn shots' features, a direct least-squares solve, the test set
    labels = data.labels_of(splits.train)
    x_test, y_test = features(model, splits.eval, batch_size=64)
    for k, r in result["results"].items():
        for seed, accuracy in zip([0, 1], r["accuracy"]):
            idx = shot_indices(shot_order(labels, 10, seed), k)
            x, _ = features(model, splits.train, batch_size=64, indices=idx.tolist())
            mean, std = x.mean(0), x.std(0) + 1e-5
            design = lambda f: np.c_[(f - mean) / std, np.full(len(f), 100.0)]  # noqa: E731
            a, targets = design(x), 2 * np.eye(10)[labels[idx]] - 1
            w = np.linalg.lstsq(np.r_[a, np.sqrt(FEWSHOT_L2_REG) * np.eye(a.shape[1])],
                                np.r_[targets, np.zeros((a.shape[1], 10))], rcond=None)[0]
            assert accuracy == pytest.approx(float(((design(x_test) @ w).argmax(1) == y_test).mean()))
        assert r["mean"] == pytest.approx(np.mean(r["accuracy"]))
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


@pytest.mark.parametrize("as_folder", [False, True], ids=["wds-shards", "folder-of-classes"])
def test_eval_on_a_set_without_splits_evaluates_every_image(run, tmp_path, capsys, as_folder):
    out, _ = run
    shard = write_cls_shards(tmp_path / "shards")
    spec = f"wds:{shard}"
    if as_folder:  # the same images as class folders (names with a slash replaced), no train/val/test
        spec = f"folder:{tmp_path / 'folder'}"
        for i, (image, label) in enumerate(zip(*blocks(40, 5))):
            d = tmp_path / "folder" / f"{label:02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(d / f"{i:03d}.png")
    assert cli.main(["eval", str(out), "--data", spec, "--json", str(tmp_path / "eval.json")]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["n"] == 40 and record["split"] == "all" and 0 <= record["top1"] <= 1
    printed = capsys.readouterr().out.splitlines()
    assert "all: 40 images" in printed
    assert as_folder == any(line.startswith("note: ") and "names its classes by number only" in line for line in printed)



# --------------------------------------------------------------------------------------------------------------
# The surface a user meets: Python inference, labels matched by name, predict on many files
# --------------------------------------------------------------------------------------------------------------


def test_classify_an_image_in_python_as_the_cli_does(run, tmp_path, capsys):
    out, _ = run
    image, _ = blocks(1, seed=9)
    path = tmp_path / "shoe.png"
    Image.fromarray(image[0]).save(path)
    model = vitlab.load_model(out)
    top = vitlab.predict(model, str(path), k=3)  # what the README's quick start does
    assert cli.main(["predict", str(out), str(path), "--top-k", "3"]) == 0
    printed = [line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(name.strip(), f"{p:.4f}") for name, p in top] == [(name.strip(), p) for name, p in printed]
    # every kind of input gives the same answer: a path, a PIL image, a uint8 tensor, a float tensor in [0, 1]
    pil = Image.open(path)
    as_uint8 = torch.from_numpy(image[0])[None]
    for same in (pil, as_uint8, as_uint8.float() / 255):
        assert vitlab.predict(model, same, k=3) == top
    assert len(vitlab.predict(model, [str(path), pil], k=2)) == 2
    x = vitlab.preprocess(model)(pil)  # what the model takes: resized, normalised with its statistics
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    assert probs.argmax().item() == model.cfg.class_names.index(top[0][0])


def test_eval_matches_class_folders_to_the_models_classes_by_name(run, tmp_path, capsys):
    out, _ = run
    model = load_model(out)
    images, labels = blocks(30, seed=11)
    root = tmp_path / "set"
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / model.cfg.class_names[label].replace("/", "_")  # "T-shirt/top" cannot be a folder name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    assert cli.main(["eval", str(out), "--data", f"folder:{root}", "--precision", "fp32", "--json",
                     str(tmp_path / "by_name.json")]) == 0
    by_name = json.loads((tmp_path / "by_name.json").read_text())
    x = torch.stack([eval_transform((16, 16), 1)(torch.from_numpy(image)[None]) for image in images])
    with torch.no_grad():
        expected = (model(runtime.normalize(x, model.cfg.mean, model.cfg.std)).argmax(-1) == torch.tensor(labels))
    assert by_name["n"] == 30 and by_name["top1"] == pytest.approx(expected.float().mean().item())
    capsys.readouterr()
    (root / "Rowboat").mkdir()
    Image.fromarray(images[0]).save(root / "Rowboat" / "x.png")
    assert cli.main(["eval", str(out), "--data", f"folder:{root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classes ['Rowboat'] are not among the model's 10" in err[0]


def test_predict_on_many_files_loses_nothing(run, tmp_path, capsys):
    out, _ = run
    images, _ = blocks(2, seed=4)
    (tmp_path / "dir").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "dir" / f"good{i}.png")
    (tmp_path / "dir" / "truncated.png").write_bytes((tmp_path / "dir" / "good0.png").read_bytes()[:60])
    (tmp_path / "notes.txt").write_text("not an image")
    argv = ["predict", str(out), str(tmp_path / "dir"), str(tmp_path / "notes.txt"), "--json", str(tmp_path / "p.json")]
    assert cli.main(argv) == 1  # some failed
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0::6] == [str(tmp_path / "dir" / "good0.png"), str(tmp_path / "dir" / "good1.png")]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and "truncated.png" in errors[0] and "notes.txt" in errors[1]
    assert "2 of 4 images could not be read" in errors[2] and "BytesIO" not in captured.err
    records = json.loads((tmp_path / "p.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["good0.png", "good1.png", "truncated.png", "notes.txt"]
    assert len(records[0]["predictions"]) == 5 and set(records[0]["predictions"][0]) == {"label", "index", "probability"}
    assert "error" in records[2] and "predictions" not in records[2]
