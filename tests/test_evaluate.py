"""Evaluation and prediction on a checkpoint trained here (tests/tiny.py's set and model)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny import TINY, blocks, tiny_world, write_fashion_mnist, fashion_dir, world  # noqa: F401 (fixtures)
from vitlab import cli, data
from vitlab.evaluate import Classification, evaluate, predict
from vitlab.train import TrainConfig, train
from vitlab.weights import load_model


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
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=data.TrainAug())
    loader = data.make_loader(splits.eval, 50, shuffle=False, seed=0, epoch=0, even=False)
    result = evaluate(model, loader, torch.device("cpu"))

    # the same numbers, computed directly from the raw test images
    images, labels = blocks(128, seed=1)
    x = data.eval_transform((16, 16), 1)(torch.from_numpy(images)[:, None])
    with torch.no_grad():
        logits = model(data.normalize(x, model.cfg.mean, model.cfg.std))
    labels = torch.from_numpy(labels)
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    assert result["n"] == 128
    assert result["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["top5"] == pytest.approx(top5) and result["top5"] >= result["top1"]
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert not model.training  # evaluate leaves the mode as it found it (load_model gives eval mode)


def test_the_evaluator_runs_a_split(run):
    out, accuracy = run
    splits = data.build("fashion-mnist", image_size=(16, 16), in_chans=1, train_transform=data.TrainAug())
    evaluator = Classification(splits.eval, "test", batch_size=64, device=torch.device("cpu"), precision="fp32")
    model = load_model(out).train()
    assert evaluator.run(model)["top1"] == pytest.approx(accuracy)
    assert model.training


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
    ranked = predict(model, paths, top_k=10)
    x = data.eval_transform((16, 16), 1)(torch.from_numpy(images)[:, None])
    with torch.no_grad():
        probs = model(data.normalize(x, model.cfg.mean, model.cfg.std)).softmax(-1)
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
    assert cli.main(["predict", str(out), str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("vitlab predict: error: ") and str(bad) in err
