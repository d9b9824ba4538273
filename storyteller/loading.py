"""Model loading, in one place: which files a model folder holds, where a model is (a local folder or a Hub repo id
at a revision), its weights (one file or the shards of an index), the checks that catch a Git LFS pointer or a
truncated file before safetensors reads it, and strict loading of the weights into a decoder.

    resolve_model_dir("user/model", revision="v1")   # a local folder holding the model's files (a Hub snapshot)
    check_model_folder(folder, source)               # its config.json, checked; every weight file checked
    load_weights_strictly(model, folder)             # every tensor present, none extra, all finite
    save_weights(state, out)                         # model.safetensors, or shards and their index

``storyteller.captioner.load`` builds a Captioner from these, ``storyteller.decoders`` loads its decoders
through them, and ``train bundle`` and ``hub_upload.py`` write and publish the same files. Every failure a user
can meet raises :class:`ModelLoadError` saying what to do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .confidence import CALIBRATION_FILE, NEIGHBOURS_FILE
from .decoding_settings import decoding_hints
from .fileio import atomic_path, write_json_atomic
from .vocab import Vocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]
# The default model: the repository's models/ folder in a checkout; an installed package (`pip install .`) holds
# the same files in storyteller/_models/ (pyproject.toml), so load() works from any directory, offline.
_CHECKOUT_MODEL_DIR = REPO_ROOT / "models" / "flickr8k-lite0-ensemble"
PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "_models" / "flickr8k-lite0-ensemble"
DEFAULT_MODEL_DIR = _CHECKOUT_MODEL_DIR if _CHECKOUT_MODEL_DIR.is_dir() else PACKAGED_MODEL_DIR
MODEL_ENV_VAR = "STORYTELLER_MODEL"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A model's weights over MAX_SHARD_BYTES are written in shards (``train bundle``), in the Hub's layout: an index
# naming the file of every tensor, and files model-00001-of-0000N.safetensors, each small enough for a repository
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SHARDS_GLOB = "model-*-of-*.safetensors"
MAX_SHARD_BYTES = 20_000_000  # every shipped file stays well under the 30 MB a repository file may take
# A model folder's files, the one list that loading, downloading (snapshot_download) and publishing
# (hub_upload.py) share: what it must hold, what it may hold (the card and what the card shows), and
# the card's example thumbnails (written by `train evaluate --write-to-model`).
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)
OPTIONAL_MODEL_FILES = ("README.md", "evaluation.json", "loss_curve.png", "metric_curve.png", CALIBRATION_FILE, NEIGHBOURS_FILE)
MODEL_EXAMPLES_GLOB = "examples/*.jpg"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to pass instead."""


# -- where the model is ------------------------------------------------------------------------------

def default_model() -> str:
    """The model ``load()`` uses with no argument: ``$STORYTELLER_MODEL``, else the bundled folder.

    Raises:
        ModelLoadError: neither is set / present.
    """
    env = os.environ.get(MODEL_ENV_VAR, "").strip()
    if env:
        return env
    if DEFAULT_MODEL_DIR.is_dir():
        return str(DEFAULT_MODEL_DIR)
    raise ModelLoadError(
        f"no model given and no bundled model at {DEFAULT_MODEL_DIR}. Pass one: a local folder with "
        f"{', '.join(MODEL_FILES)} (e.g. made by `python -m train fit`) or a Hugging Face Hub repo id, as "
        f"load('user/model') in Python, --model user/model on the command line, or the environment variable "
        f"{MODEL_ENV_VAR}=user/model.")


def model_label(source: str) -> str:
    """How to name a model to users without showing a machine's folders: a Hub repo id as is; a local
    folder by its path inside this repository (``models/flickr8k-lite0-ensemble``), else by its own name.

    Args:
        source: what ``load`` was given (a folder or a repo id).
    """
    if is_hub_id(source):
        return source
    path = Path(source).expanduser()
    try:
        if path.resolve() == PACKAGED_MODEL_DIR:  # the installed package's copy of the default: named as in a checkout
            return f"models/{PACKAGED_MODEL_DIR.name}"
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.resolve().name or source


def check_weights_file(path: str | os.PathLike) -> None:
    """Refuse a ``model.safetensors`` that cannot be the weights, before safetensors reads it.

    Catches a Git LFS pointer left by a clone without LFS, a file cut short (interrupted download
    or copy) and a file that is not safetensors at all, each with what to do about it.

    Args:
        path: the weights file.

    Raises:
        ModelLoadError: the file is a pointer, truncated or corrupt.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if (head + f.read(len(_LFS_POINTER) - 8)).startswith(_LFS_POINTER):
                raise ModelLoadError(
                    f"{path} is a Git LFS pointer, not the weights: the repository was cloned without Git LFS. "
                    f"Install it and fetch the files (`git lfs install && git lfs pull`), or download the model "
                    f"from the Hub.")
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError("no valid safetensors header")
            f.seek(8)
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelLoadError(f"{path} is not a safetensors weights file (corrupt or the wrong file); download or "
                             f"export the model again") from None
    if size < 8 + n + end:
        raise ModelLoadError(f"{path} is truncated ({size:,} bytes, its header promises {8 + n + end:,}): an "
                             f"interrupted download or copy. Download or copy the model again.")


def _hub_offline() -> bool:
    """Whether the Hub client is in offline mode (``HF_HUB_OFFLINE``, read as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a local path (``./x``, ``/x``, ``~/x``, ``x/y/z``...): it cannot be a Hub repo
    id (``user/model``), so it must have meant a folder."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def is_hub_id(name: str) -> bool:
    """Whether ``load(name)`` goes to the Hub: no such folder here, and not written as a path."""
    return not Path(name).expanduser().exists() and not looks_like_path(name)


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder holding the model's files: the folder itself, or a Hub snapshot (downloaded or cached).

    Args:
        name_or_path: a local folder or a Hub repo id (``"user/model"``).
        revision: Hub branch, tag or commit (repo ids only).

    Raises:
        ModelLoadError: no such folder, no such repo/revision, or no network and nothing cached.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        missing = missing_model_files(local)
        if missing:
            raise ModelLoadError(f"model folder {local} is missing {', '.join(missing)}; a model folder needs "
                                 f"{', '.join(MODEL_FILES)} (written by ShowAndTell.save_pretrained)")
        return local
    if local.exists():
        raise ModelLoadError(f"{local} is a file; pass the model folder that holds {', '.join(MODEL_FILES)}")
    if looks_like_path(name_or_path):
        raise ModelLoadError(f"no model folder at {local.resolve()} (and it is not a Hub repo id like 'user/model')")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    if _hub_offline():  # already offline: asking to set it again would not help
        offline_hint = (f"HF_HUB_OFFLINE is set, so only the Hugging Face cache is looked at: download the model "
                        f"into it once while online (`hf download {name_or_path}`), or pass a local model folder.")
    else:
        offline_hint = (f"Without network, set HF_HUB_OFFLINE=1 and use a copy in the Hugging Face cache "
                        f"(download it once with `hf download {name_or_path}`), or pass a local model folder.")
    try:
        path = snapshot_download(repo_id=name_or_path, revision=revision,
                                 allow_patterns=[*MODEL_FILES, WEIGHTS_INDEX_FILE, WEIGHT_SHARDS_GLOB,
                                                 *OPTIONAL_MODEL_FILES, MODEL_EXAMPLES_GLOB])
    except HFValidationError as e:
        raise ModelLoadError(f"{name_or_path!r} is neither a local folder nor a valid Hub repo id ({e})") from None
    except GatedRepoError:
        raise ModelLoadError(f"Hub repo {name_or_path} is gated: accept its terms on huggingface.co and log in "
                             f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"no Hub model repo {name_or_path!r} (or it is private: log in with `hf auth login` "
                             f"or set HF_TOKEN), and no local folder of that name") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"Hub repo {name_or_path} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelLoadError(f"{name_or_path!r} is not a local folder ({local.resolve()} does not exist), and the "
                             f"Hugging Face Hub could not be reached for it{at} with nothing in the local cache "
                             f"({type(e).__name__}). {offline_hint}") from None
    except Exception as e:  # other HTTP errors (HfHubHTTPError), proxy/connection failures, disk errors
        raise ModelLoadError(f"could not download {name_or_path}{at} from the Hub: {type(e).__name__}: {e}. "
                             f"{offline_hint}") from None
    path = Path(path)
    missing = missing_model_files(path)
    if missing:
        raise ModelLoadError(f"Hub repo {name_or_path}{at} is not a Neural Storyteller model: it has no "
                             f"{', '.join(missing)}")
    return path


def missing_model_files(folder: Path) -> list[str]:
    """What a model folder lacks of ``MODEL_FILES``; its weights may be ``model.safetensors`` or the shards of
    ``model.safetensors.index.json`` (a missing shard is named)."""
    missing = [f for f in (CONFIG_FILE, VOCAB_FILE) if not (folder / f).is_file()]
    try:
        weights = local_weight_files(folder)
    except ValueError as e:  # an unreadable index
        return missing + [f"readable {WEIGHTS_INDEX_FILE} ({e})"]
    return missing + ([f.name for f in weights if not f.is_file()] if weights else [WEIGHTS_FILE])



# -- the weight files: one, or the shards of an index ----------------------------------------------

def local_weight_files(folder: Path) -> list[Path]:
    """The weight files of a local model folder: ``model.safetensors``, else the shards its index names (which
    may be missing: the caller checks), else none.

    Raises:
        ValueError: an index that is not a JSON object with a ``weight_map``.
    """
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / WEIGHTS_INDEX_FILE
    if not index.is_file():
        return []
    return [folder / name for name in shard_names(index)]


def shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names, in order.

    Raises:
        ValueError: not a JSON object with a ``weight_map`` of plain file names.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unreadable {WEIGHTS_INDEX_FILE} ({type(e).__name__}: {e})") from None
    if not names or not all(isinstance(n, str) and n == Path(n).name for n in names):
        raise ValueError(f"{WEIGHTS_INDEX_FILE} must map every tensor to a file beside it, got {names[:3]}")
    return names


def resolve_weight_files(model_id: str, **hub_kwargs) -> list[Path]:
    """The weight files of a local model folder or a Hub repo: ``model.safetensors``, or the shards of
    ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: no weights, or a shard the index names is missing.
        ValueError: an unreadable index.
    """
    local = Path(model_id)
    if local.is_dir():
        files = local_weight_files(local)
        if not files:
            raise FileNotFoundError(f"{model_id} is missing {WEIGHTS_FILE}")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_id} is missing {', '.join(missing)} (named in {WEIGHTS_INDEX_FILE})")
        return files
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return [resolve_file(model_id, WEIGHTS_FILE, **hub_kwargs)]
    except EntryNotFoundError:  # a sharded model
        index = resolve_file(model_id, WEIGHTS_INDEX_FILE, **hub_kwargs)
        return [resolve_file(model_id, name, **hub_kwargs) for name in shard_names(index)]


def resolve_file(model_id: str, filename: str, **hub_kwargs) -> Path:
    """A file of a local model folder, or downloaded from the Hub repo ``model_id``."""
    local = Path(model_id)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{model_id} is missing {filename}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs))


# -- a model folder's config and weights -------------------------------------------------------------

def check_model_folder(model_dir: Path, source: str) -> dict[str, Any]:
    """A model folder's ``config.json``, checked before anything is built from it: it names a backbone, its
    recommended decoding is in range, and every weight file is safetensors, whole (:func:`check_weights_file`).

    Args:
        model_dir: the folder (:func:`resolve_model_dir`'s).
        source: what the user named it, for the messages.

    Raises:
        ModelLoadError: what is wrong and what to do.
    """
    try:
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{source}: unreadable {CONFIG_FILE} ({e})") from None
    if not isinstance(config, dict) or not config.get("backbone"):
        raise ModelLoadError(f"{source}: {CONFIG_FILE} names no backbone, so the image features cannot be "
                             f"computed; re-export the model with its backbone spec (ShowAndTell(..., backbone=spec))")
    try:
        decoding_hints(config.get("extra"))
    except ValueError as e:  # checked here, not at the first caption
        raise ModelLoadError(f"{source}: {CONFIG_FILE}: {e}") from None
    for path in local_weight_files(model_dir):
        check_weights_file(path)
    return config


def load_vocabulary(model_id: str, vocab_size: int, **hub_kwargs: Any) -> Vocabulary:
    """A model's ``vocab.json``, checked against the ``vocab_size`` of its config.

    Args:
        model_id: a local model folder or a Hub repo id.
        vocab_size: what ``config.json`` says.
        **hub_kwargs: ``hf_hub_download``'s (revision, cache_dir...), for a repo id.

    Raises:
        ValueError: a vocabulary of another size.
    """
    vocab = Vocabulary.load(resolve_file(model_id, VOCAB_FILE, **hub_kwargs))
    if len(vocab) != vocab_size:
        raise ValueError(f"{model_id}: {VOCAB_FILE} has {len(vocab)} tokens but {CONFIG_FILE} says "
                         f"vocab_size={vocab_size}; the vocabulary does not belong to these weights")
    return vocab


def load_weights_strictly(model: torch.nn.Module, model_id: str, map_location: str = "cpu", strict: bool = True,
                          **hub_kwargs: Any) -> None:
    """Load a model's weights (``model.safetensors`` or its shards) into ``model``: strict by default (the Hub
    mixin's ``strict=False`` would leave missing tensors random), safetensors only (no pickle fallback), and
    every weight finite.

    Args:
        model: the decoder, built from the config.
        model_id: a local model folder or a Hub repo id.
        map_location: where the tensors are read to.
        strict: refuse missing or unexpected tensors.
        **hub_kwargs: ``hf_hub_download``'s (revision, cache_dir...), for a repo id.

    Raises:
        ValueError: weights that do not match the config, or NaN / infinite values.
        FileNotFoundError: no weights, or a missing shard.
    """
    import safetensors.torch

    files = resolve_weight_files(model_id, **hub_kwargs)
    what = WEIGHTS_FILE if len(files) == 1 else f"the weight shards of {WEIGHTS_INDEX_FILE}"
    try:
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(safetensors.torch.load_file(str(path), device=map_location))
        model.load_state_dict(state, strict=strict)  # copies into the float32 parameters
    except (RuntimeError, ValueError) as e:  # shape mismatch, missing/unexpected tensors, corrupt file
        raise ValueError(f"{model_id}: {what} does not match {CONFIG_FILE}: {e}") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{model_id}: {what} holds NaN or infinite values (in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the weights are broken: train or download them again")


def save_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``state`` as ``out/model.safetensors``, or, over ``max_shard_bytes``, as shards and their index in the Hub's
    layout (``huggingface_hub.split_torch_state_dict_into_shards``), so no file is too big for a repository; each
    file written atomically.

    Args:
        state: tensor name -> tensor (contiguous, on the CPU).
        out: the model folder.
        max_shard_bytes: the most bytes one weight file may hold.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        with atomic_path(out / filename) as tmp:
            save_file({k: state[k] for k in names}, str(tmp), metadata={"format": "pt"})
    if split.is_sharded:
        write_json_atomic(out / WEIGHTS_INDEX_FILE, {"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                          indent=2, sort_keys=True)
