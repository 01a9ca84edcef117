"""The MODEL argument -> a local checkpoint folder.

A directory is used as it is; anything else is taken as a Hugging Face hub id and resolved
through huggingface_hub (which honours HF_HUB_OFFLINE and its local cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Only what serving needs: configs, tokenizer, safetensors (and Meta's layout, its
# tokenizer.model too: read where a repo has no tokenizer.json). Mistral's
# repos also hold their weights in Mistral's own layout (consolidated.safetensors, as large as
# the Hugging Face shards beside it), which the loader never reads.
HUB_ALLOW = ["*.json", "*.safetensors", "*.jinja", "consolidated.*.pth", "params.json",
             "tokenizer.model"]
HUB_IGNORE = ["consolidated*.safetensors"]
# A tokenizer given apart (--tokenizer): its files alone, never a repo's weights
TOKENIZER_ALLOW = ["*.json", "*.jinja", "tokenizer.model"]


class ModelSourceError(ValueError):
    """The model argument names nothing we can load."""


def resolve_model(model: str, revision: str | None = None, tokenizer_only: bool = False
                  ) -> Path:
    """A folder as it is, a hub id's snapshot (at `revision`; only its tokenizer's files
    with `tokenizer_only`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelSourceError(f"{model} is a file; MODEL must be a checkpoint folder or hub id")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelSourceError(f"{model}: no such folder (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            model, revision=revision,
            allow_patterns=TOKENIZER_ALLOW if tokenizer_only else HUB_ALLOW,
            ignore_patterns=HUB_IGNORE)
    except LocalEntryNotFoundError as e:
        raise ModelSourceError(f"{model} is not in the local Hugging Face cache and the hub "
                               f"cannot be reached (offline?): {e}") from e
    except HFValidationError as e:
        raise ModelSourceError(f"{model} is not a valid hub id: {e}") from e
    except Exception as e:  # network and auth errors come in many types
        raise ModelSourceError(f"cannot fetch {model} from the hub: {e}") from e
    logger.info("resolved %s to %s", model, folder)
    return Path(folder)
