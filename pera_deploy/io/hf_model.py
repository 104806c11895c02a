"""The transformers model a local folder describes: its class, its names, its weights.

Only classes that ship with transformers are used (never remote code), and nothing is
downloaded. Importing this module is cheap; each function imports transformers.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..scoped import quiet_transformers


@contextmanager
def built_from(folder: Path, cls: Any) -> Iterator[None]:
    """transformers building a model from a folder's config and files: whatever it raises
    about them (a null where a size belongs, a missing weight) is about the user's folder."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, OSError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{folder}: transformers cannot build {getattr(cls, '__name__', cls)} from this folder "
                         f"({type(exc).__name__}: {first})") from None


def model_class(folder: Path) -> tuple[Any, Any]:
    """A folder's config and the transformers class it names (AutoModel if it names none)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  transformers read the user's config: whatever it says is about it
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{folder}/config.json: not a transformers config ({first})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else transformers.AutoModel
    if cls is None:
        raise InputError(f"{folder}/config.json: architecture {arch} is not one transformers provides")
    return config, cls


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model from a local folder, by the class its config names, in eval mode."""
    folder = Path(folder)
    _, cls = model_class(folder)
    with quiet_transformers(), built_from(folder, cls):
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    return model


def model_names(folder: str | Path) -> tuple[list[str], list[str]]:
    """The module paths and parameter names of the model a folder's config describes.

    Built on the meta device from the config alone: no weight is read or allocated. These
    are the names PEFT matches adapter keys against, which can differ from a checkpoint's
    own tensor names (the Hub's gpt2 saves `h.0...`; GPT2LMHeadModel calls it
    `transformer.h.0...`).
    """
    config, cls = model_class(Path(folder))
    with torch.device("meta"), built_from(Path(folder), cls):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    return [n for n, _ in model.named_modules() if n], [n for n, _ in model.named_parameters()]
