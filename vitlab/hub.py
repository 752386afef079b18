"""Checkpoints on the Hugging Face hub, named `hf-hub:ORG/NAME` (timm's spelling) wherever vitlab takes a
checkpoint: `hf-hub:google/vit-base-patch16-224` (transformers' layout) or
`hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` (timm's).

`huggingface_hub` fetches the repository's safetensors and JSON files into its cache (never its pickled
`pytorch_model.bin`) and gives back the snapshot directory, which vitlab then reads like any directory that timm or
transformers wrote. Where there is no network, or HF_HUB_OFFLINE=1, the cache alone answers. Its place follows
huggingface_hub's variables (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME), read at each call rather than at
import, so that a variable set by the caller after huggingface_hub was imported still counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .common import CheckpointError

PREFIX = "hf-hub:"
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def _cache_dir() -> str | None:
    """The hub cache huggingface_hub would use with the environment as it is now (None: its own default)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub") if os.environ.get("HF_HOME") else None


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                        "TRANSFORMERS_OFFLINE"))


def snapshot(source: str) -> Path:
    """The local directory of `hf-hub:ORG/NAME[@REVISION]`: downloaded or updated where the hub can be reached,
    from the cache otherwise; a CheckpointError naming the id when neither has it."""
    repo, _, revision = source[len(PREFIX):].partition("@")
    if not _REPO.match(repo):
        raise CheckpointError(f"{source}: a hub checkpoint is named hf-hub:ORG/NAME (e.g. "
                              "hf-hub:google/vit-base-patch16-224)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{source}: reading the Hugging Face hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    cache, offline = _cache_dir(), _offline()
    where = f"the hub cache ({cache or 'the default'})"
    try:
        folder = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=["*.json", "*.safetensors"])
    except GatedRepoError:
        raise CheckpointError(f"{source}: a gated repository: accept its terms on huggingface.co and log in "
                              "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{source}: no such model on the Hugging Face hub (or a private one)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: the hub has no revision {revision!r} of {repo}") from None
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{source}: not in {where}, and {reason}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{source}: the hub answered {type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0]}") from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{source}: no safetensors weights in the repository (vitlab never unpickles "
                              "pytorch_model.bin)")
    return folder
