"""Checkpoints on the Hugging Face hub, `hf-hub:ORG/NAME`, wherever a command takes one: each test builds a hub
cache in a temporary directory, in huggingface_hub's layout (models--ORG--NAME/refs/main, snapshots/COMMIT/...),
from the timm and transformers fixtures their libraries wrote, and runs offline. Nothing touches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import official
import pytest
import torch
from checkpoints import max_diff
from datasets import fmnist  # noqa: F401 (fixture)
from huggingface_hub import errors

from vitlab import cli, hub
from vitlab.common import CheckpointError
from vitlab.weights import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPOS = {"timm/vit_tiny.fixture": "timm_vit", "google/vit-tiny-fixture": "transformers_vit"}


def cache(root: Path, repos: dict[str, str] = REPOS) -> Path:
    """A hub cache holding each repository's snapshot: the fixture's files, as huggingface_hub lays them out."""
    for repo, fixture in repos.items():
        folder = root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(COMMIT)
        shutil.copytree(official.path(fixture), folder / "snapshots" / COMMIT)
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and the hub cache in tmp_path/hub (empty until `cache` fills it)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("repo", list(REPOS))
def test_a_hub_id_loads_from_the_cache_as_its_library_wrote_it(offline, repo):
    cache(offline)
    model = load_model(f"hf-hub:{repo}")
    x, logits = official.expected(REPOS[repo])
    with torch.no_grad():
        assert max_diff(model(x), logits) < 1e-4
    assert model.cfg.num_heads == 4  # from the config.json in the snapshot


def test_hf_home_places_the_cache_too(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache(tmp_path / "home" / "hub")
    assert load_model("hf-hub:timm/vit_tiny.fixture").cfg.num_classes == 10


def test_eval_on_a_hub_id_equals_eval_on_the_files(offline, fmnist, capsys, tmp_path):
    cache(offline)
    for repo, fixture in REPOS.items():
        code, _, err = run(capsys, "eval", official.path(fixture), "--data", "fashion-mnist", "--json",
                           tmp_path / "local.json")
        assert code == 0, err
        code, out, err = run(capsys, "eval", f"hf-hub:{repo}", "--data", "fashion-mnist", "--json",
                             tmp_path / "hub.json")
        assert code == 0, err
        assert "top1: " in out
        local, remote = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "hub.json"))
        assert remote["checkpoint"] == f"hf-hub:{repo}"
        assert (remote["top1"], remote["loss"], remote["n"]) == (local["top1"], local["loss"], local["n"])


def test_convert_and_inspect_take_a_hub_id(offline, capsys, tmp_path):
    cache(offline)
    code, out, err = run(capsys, "convert", "hf-hub:google/vit-tiny-fixture", tmp_path / "converted")
    assert code == 0, err
    assert "2 layers, width 32, 4 heads" in out
    assert load_model(tmp_path / "converted").cfg.layer_norm_eps == 1e-12
    code, out, err = run(capsys, "inspect", "hf-hub:timm/vit_tiny.fixture", "--out", tmp_path / "inspect")
    assert code == 0, err
    assert (tmp_path / "inspect" / "index.html").is_file()


@pytest.mark.slow
def test_finetune_from_a_hub_id(offline, fmnist, capsys, tmp_path):
    code, out, err = run(capsys, "finetune", "--init", "hf-hub:timm/vit_tiny.fixture", "--data", "fashion-mnist",
                         "--steps", "1", "--batch-size", "8", "--num-workers", "0", "--out", tmp_path / "run")
    assert code == 2 and "not in the hub cache" in err  # nothing cached yet
    cache(offline)
    code, out, err = run(capsys, "finetune", "--init", "hf-hub:timm/vit_tiny.fixture", "--data", "fashion-mnist",
                         "--steps", "1", "--batch-size", "8", "--num-workers", "0", "--out", tmp_path / "run")
    assert code == 0, err
    assert "init: hf-hub:timm/vit_tiny.fixture: position embeddings 4x4 -> 4x4 patches" in out


@pytest.mark.slow
def test_the_error_without_network_or_cache_is_one_line_as_a_user_sees_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-m", "vitlab", "eval", "hf-hub:google/vit-base-patch16-224", "--data",
                             "fashion-mnist"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"vitlab eval: error: hf-hub:google/vit-base-patch16-224: not in the hub cache "
                                     f"({tmp_path / 'empty'}), and HF_HUB_OFFLINE is set")


def raising(error_type):
    """A snapshot_download that fails as huggingface_hub does when the hub answers with `error_type`."""
    def snapshot_download(*args, **kwargs):
        error = error_type.__new__(error_type)
        Exception.__init__(error, "404 Client Error")
        raise error
    return snapshot_download


@pytest.mark.parametrize("error_type,fragment", [
    (errors.RepositoryNotFoundError, "hf-hub:nobody/nothing: no such model on the Hugging Face hub"),
    (errors.GatedRepoError, "hf-hub:nobody/nothing: a gated repository"),
    (errors.LocalEntryNotFoundError, "hf-hub:nobody/nothing: not in the hub cache"),
])
def test_hub_errors_are_one_line_naming_the_id(monkeypatch, capsys, tmp_path, error_type, fragment):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", raising(error_type))
    code, _, err = run(capsys, "convert", "hf-hub:nobody/nothing", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    if error_type is errors.LocalEntryNotFoundError:
        assert "the hub cannot be reached" in err


def test_a_malformed_id_or_a_repository_without_safetensors(offline, tmp_path):
    with pytest.raises(CheckpointError, match="a hub checkpoint is named hf-hub:ORG/NAME"):
        load_model("hf-hub:just-a-name")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    folder = offline / "models--org--pickled"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    shutil.copytree(pickled, folder / "snapshots" / COMMIT)
    with pytest.raises(CheckpointError, match="hf-hub:org/pickled: no safetensors weights in the repository"):
        load_model("hf-hub:org/pickled")


def test_the_id_reaches_huggingface_hub_with_what_to_fetch(monkeypatch, tmp_path):
    """Only the safetensors and JSON files, at the revision after @, into the cache the environment names."""
    seen = {}

    def snapshot_download(repo, **kwargs):
        seen.update(kwargs, repo=repo)
        return str(official.path("timm_vit"))

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hub.snapshot("hf-hub:timm/some_vit@v2") == official.path("timm_vit")
    assert seen == dict(repo="timm/some_vit", revision="v2", cache_dir=str(tmp_path), local_files_only=False,
                        allow_patterns=["*.json", "*.safetensors"])

