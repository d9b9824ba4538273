"""Publish a model folder to the Hugging Face Hub (and optionally the Gradio Space that serves it).

    python hub_upload.py MODEL_DIR --repo-id USER/NAME [--private] [--revision BRANCH]
                         [--commit-message MSG] [--dry-run] [--space-id USER/SPACE [--bundle] [--hardware zerogpu|cpu]]

1. **Validate** the folder: load it exactly as the app does (``storyteller.captioner.load``) and
   caption an example photo; a folder that fails is refused and nothing is uploaded.
2. **Write the model card** ``MODEL_DIR/README.md`` with ``storyteller.card.write_model_card``.
3. ``create_repo(exist_ok=True)`` (+ ``create_branch`` for ``--revision``) and ``upload_folder`` of
   the model files only (``storyteller.captioner``'s list: ``config.json``, ``model.safetensors``,
   ``vocab.json``, ``README.md`` and, if present, ``evaluation.json``, the curves and the card's
   ``examples/*.jpg``): no checkpoints, no pickles, no stray files. A folder whose config,
   evaluation or card names an absolute path of some machine is refused.
4. With ``--space-id``: push the Space — ``app.py``, ``requirements.txt``, ``storyteller/``,
   ``examples/``, a ``README.md`` with the Space front matter and a description that fits the model
   (pooled or attention), and ``space_model.txt``: one line, ``USER/NAME@COMMIT``, the model repo at the
   commit just uploaded. The Space's app downloads that model from the Hub at start-up (through the Hub
   cache), so no weights travel with the Space; a new model version reaches it by changing that one line
   (or by running this script again, which uploads the model and re-points the line). With ``--bundle``
   the model files go into the Space as ``models/<folder name>/`` and the line names that folder (a
   Space that must start without the Hub). ``--hardware zerogpu`` (the default: what a free account can host)
   stages it for ZeroGPU: Python 3.12 in the front matter, PyTorch 2.8-2.11 and ``spaces`` in its
   requirements; ``--hardware cpu`` stages the repository's requirements as they are (CPU Basic needs a paid
   plan). The hardware is asked for when the Space is created (docs/space.md).

The token comes from ``hf auth login`` or ``HF_TOKEN``. ``--dry-run`` validates, renders the card in
a temporary copy, lists what would be uploaded and the Space's model reference, and makes no network
call and no change.

Example::

    python hub_upload.py models/flickr8k-lite0-ensemble --repo-id me/storyteller-flickr8k-lite0-ensemble --space-id me/storyteller --dry-run
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from storyteller.loading import MODEL_EXAMPLES_GLOB, MODEL_FILES, OPTIONAL_MODEL_FILES, WEIGHTS_INDEX_FILE, local_weight_files
from storyteller.card import CARD_FILE as CARD
from storyteller.vocab import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parent
SPACE_SOURCES = ("app.py", "LICENSE")  # requirements.txt is written for the hardware (space_requirements)
# The Space's model reference, read by app.py (app.SPACE_MODEL_FILE): one line, "user/model@commit", or a
# folder inside the Space with --bundle.
SPACE_MODEL_FILE = "space_model.txt"
PENDING_COMMIT = "<the commit this upload makes>"  # a dry run's stand-in: the commit is known only after the upload
# The Space's hardware (--hardware): the Hub's name for it, the Python the Space runs, and what its requirements
# change. ZeroGPU (what a free account can host) supports Python 3.10 and 3.12 and PyTorch 2.8 to 2.11 (hub-docs,
# spaces-zerogpu.md), and needs Hugging Face's `spaces` package for @spaces.GPU; CPU hardware takes the
# repository's requirements as they are (docs/space.md).
HARDWARE = {"zerogpu": "zero-a10g", "cpu": "cpu-basic"}
PYTHON_VERSION = {"zerogpu": "3.12", "cpu": "3.11"}
ZEROGPU_REQUIREMENTS = {"torch": "torch>=2.8,<2.12", "torchvision": "torchvision>=0.23,<0.27"}  # 0.23 goes with 2.8


class UploadRefused(Exception):
    """The folder (or the environment) is not fit to upload; the message says why."""


# -- checks ------------------------------------------------------------------------------------------
def model_files(model_dir: Path) -> tuple[list[str], list[str]]:
    """(files to upload, files left out) of a model folder, as names relative to it.

    Args:
        model_dir: the model folder.
    """
    keep = [f for f in MODEL_FILES + OPTIONAL_MODEL_FILES if f != CARD and (model_dir / f).is_file()]
    if (model_dir / WEIGHTS_INDEX_FILE).is_file():  # sharded weights: the index and its shards
        keep += [WEIGHTS_INDEX_FILE] + [p.name for p in local_weight_files(model_dir) if p.is_file()]
    keep += sorted(p.relative_to(model_dir).as_posix() for p in model_dir.glob(MODEL_EXAMPLES_GLOB))
    keep.append(CARD)  # always: publish() writes it
    left_out = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                      if p.is_file() and p.relative_to(model_dir).as_posix() not in keep)
    return keep, left_out


def example_image() -> Any:
    """The first photo in examples/, else a generated test card (the check is that captioning runs)."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    if photos:
        return photos[0]
    from PIL import Image

    return Image.radial_gradient("L").convert("RGB").resize((320, 240))


def validate_model(model_dir: Path) -> str:
    """Load ``model_dir`` as the app would and caption an example photo; returns the caption.

    Args:
        model_dir: the model folder.

    Raises:
        UploadRefused: it does not load, or it produces no usable caption.
    """
    from storyteller.captioner import ModelLoadError, load

    if not model_dir.is_dir():
        raise UploadRefused(f"{model_dir} is not a folder")
    try:
        captioner = load(str(model_dir))
        result = captioner.caption([example_image()], beam_size=3, max_len=20)[0]
    except (ModelLoadError, ValueError, RuntimeError) as e:
        raise UploadRefused(f"{model_dir} does not work: {e}") from None
    for text in (result.greedy.text, result.beam[0].text):
        if not text.strip() or any(tok in text for tok in SPECIAL_TOKENS):
            raise UploadRefused(f"{model_dir} loads but captions badly: {text!r}")
    return result.beam[0].text


def _need_token() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise UploadRefused("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")


# -- Space -------------------------------------------------------------------------------------------
def is_attention_model(model_dir: Path) -> bool:
    """True for a model folder that shows where it looked (Show-Attend-Tell, or an ensemble holding one), False
    for Show-and-Tell."""
    import json

    from storyteller.decoders import reads_grid

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return reads_grid(config)
    except (OSError, ValueError, AttributeError):
        return False


def ensemble_description(model_dir: Path) -> str | None:
    """How an ensemble model folder's decoders read the photo and are joined, in one sentence; None for one
    decoder (or an unreadable config)."""
    import json

    from storyteller.card import ensemble_summary

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("decoder") != "ensemble":
        return None
    return ensemble_summary(config, shown=" (the page shows where)")


def space_requirements(hardware: str, source: Path = REPO / "requirements.txt") -> str:
    """The Space's requirements.txt: the repository's, and for ZeroGPU its PyTorch range and ``spaces``.

    Args:
        hardware: ``"zerogpu"`` or ``"cpu"``.
        source: the repository's requirements file.
    """
    lines = source.read_text(encoding="utf-8").splitlines()
    if hardware != "zerogpu":
        return "\n".join(lines) + "\n"
    out = []
    for line in lines:
        name = line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip()
        out.append(ZEROGPU_REQUIREMENTS.get(name, line))
    out += ["# ZeroGPU: a GPU is attached while a @spaces.GPU function runs (app.py's caption_on_device)", "spaces"]
    return "\n".join(out) + "\n"


def space_readme(repo_id: str, space_id: str, model_ref: str, attention: bool, ensemble: str | None = None,
                 hardware: str = "zerogpu") -> str:
    """The Space's README.md: front matter for the Hub plus a short description that fits the model.

    Args:
        repo_id: the model repo the Space serves.
        space_id: the Space.
        model_ref: what ``space_model.txt`` says (``repo@commit``, or a bundled folder).
        attention: the model shows where it looked (Show-Attend-Tell, or an ensemble holding one).
        ensemble: an ensemble's description (``ensemble_description``), or None for one decoder.
        hardware: ``"zerogpu"`` or ``"cpu"`` (HARDWARE): the Python version and the suggested hardware.
    """
    import gradio

    kind = "show-attend-tell" if attention else "show-and-tell"
    front = "\n".join([
        "---",
        "title: Neural Storyteller",
        "emoji: 📸",
        "colorFrom: indigo",
        "colorTo: yellow",
        "sdk: gradio",
        f"sdk_version: {gradio.__version__}",
        f'python_version: "{PYTHON_VERSION[hardware]}"',
        f"suggested_hardware: {HARDWARE[hardware]}",
        "app_file: app.py",
        "pinned: false",
        "license: mit",
        "short_description: " + ("Captions that show where they looked, greedy vs beam" if ensemble and attention else
                                 "Captions by decoders decoded as one, greedy vs beam" if ensemble else
                                 f"{'Show-Attend-Tell' if attention else 'Show-and-Tell'} captions, greedy vs beam search"),
        "models:",
        f"  - {repo_id}",
        "tags:",
        "  - image-captioning",
        f"  - {kind}",
        *(["  - ensemble"] if ensemble else []),
        "---",
    ])
    how = (f"Image captioning by {ensemble[0].lower()}{ensemble[1:]}" if ensemble else
           "Show-Attend-Tell image captioning: a frozen ImageNet CNN turns the photo into a grid of features, and "
           "an LSTM writes the caption, looking over the grid for every word (the page shows where)." if attention else
           "Show-and-Tell image captioning: a frozen ImageNet CNN sums the photo up in one feature vector, and an LSTM "
           "writes the caption.")
    if "@" in model_ref:
        source = (f"The app downloads the model [{repo_id}](https://huggingface.co/{repo_id}) from the Hub at start-up, "
                  f"at the commit named in `{SPACE_MODEL_FILE}` (`{model_ref}`). To serve another version, change that "
                  f"one line.")
    else:
        source = f"Model: [{repo_id}](https://huggingface.co/{repo_id}), bundled in `{model_ref}/`."
    return (front + f"\n\n# Neural Storyteller\n\n{how} Greedy and beam search side by side, each word shaded by "
            f"its probability, and where the two searches part.\n\n{source} JSON API: `/caption_json` "
            "(`gradio_client`). Example photos: Flickr8k validation split (Hodosh et al., 2013), research use.\n")


def stage_space(model_dir: Path, repo_id: str, space_id: str, dest: Path, model_commit: str | None,
                bundle: bool = False, bundle_name: str | None = None, hardware: str = "zerogpu"
                ) -> tuple[list[str], str]:
    """Copy what the Space needs into ``dest``; returns the staged files (relative paths, sorted) and the
    model reference written to ``space_model.txt``.

    Args:
        model_dir: the (validated) model folder.
        repo_id: the model repo.
        space_id: the Space.
        dest: an empty staging folder.
        model_commit: the model repo's commit to pin (None: ``PENDING_COMMIT``, for a dry run).
        bundle: copy the model files into the Space (``models/<bundle_name>/``) and point at them.
        bundle_name: the bundled folder's name (default: ``model_dir``'s).
        hardware: ``"zerogpu"`` or ``"cpu"``: its requirements and README front matter (HARDWARE).
    """
    if hardware not in HARDWARE:
        raise UploadRefused(f"unknown hardware {hardware!r}: use one of {', '.join(HARDWARE)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SPACE_SOURCES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    (dest / "requirements.txt").write_text(space_requirements(hardware), encoding="utf-8")
    shutil.copytree(REPO / "storyteller", dest / "storyteller", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (REPO / "examples").is_dir():
        shutil.copytree(REPO / "examples", dest / "examples")
    if bundle:
        ref = f"models/{bundle_name or model_dir.resolve().name}"
        files, _ = model_files(model_dir)
        for f in files:
            if (model_dir / f).is_file():
                (dest / ref / f).parent.mkdir(parents=True, exist_ok=True)  # examples/ thumbnails
                shutil.copy2(model_dir / f, dest / ref / f)
    else:
        ref = f"{repo_id}@{model_commit or PENDING_COMMIT}"
    (dest / SPACE_MODEL_FILE).write_text(f"# The model this Space serves: a Hub repo at a commit (or a folder here).\n"
                                         f"{ref}\n", encoding="utf-8")
    (dest / "README.md").write_text(space_readme(repo_id, space_id, ref, is_attention_model(model_dir),
                                                 ensemble_description(model_dir), hardware), encoding="utf-8")
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()), ref


# -- upload ------------------------------------------------------------------------------------------
def _render_card(model_dir: Path, files: list[str], repo_id: str, dry_run: bool, tmp: Path) -> Path:
    """Write the model card (a dry run: into a copy of the folder under ``tmp``) and refuse machine paths;
    returns the card's path."""
    from storyteller.card import published_local_paths, write_model_card

    if dry_run:  # render the card in a copy, so a dry run changes nothing
        card_dir = tmp / "model"
        card_dir.mkdir()
        for f in files:
            if (model_dir / f).is_file() and f != CARD:
                (card_dir / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(model_dir / f, card_dir / f)
        card = write_model_card(card_dir, repo_id=repo_id)
    else:
        _need_token()
        card = write_model_card(model_dir, repo_id=repo_id)
    leaks = published_local_paths(card.parent)
    if leaks:
        raise UploadRefused(f"{model_dir} names absolute paths of this machine in " + "; ".join(
            f"{name}: {', '.join(paths)}" for name, paths in leaks.items()) + ". Re-export it with the current "
            "`python -m train bundle` / `evaluate --write-to-model`, or replace them with the dataset's name")
    return card


def _stage_space_logged(model_dir: Path, repo_id: str, space_id: str, dest: Path, model_commit: str | None,
                        bundle: str | None, dry_run: bool, log, hardware: str = "zerogpu") -> tuple[list[str], str]:
    """:func:`stage_space` into a new ``dest`` (``bundle``: the bundled folder's name, None: no bundle), then the
    Space's model reference and files logged."""
    files, ref = stage_space(model_dir, repo_id, space_id, dest, model_commit, bundle=bundle is not None,
                             bundle_name=bundle, hardware=hardware)
    log(f"Space hardware: {hardware} ({HARDWARE[hardware]}, Python {PYTHON_VERSION[hardware]})")
    log(f"Space model reference ({SPACE_MODEL_FILE}): {ref}")
    log(f"{'would upload' if dry_run else 'uploading'} to Space {space_id}: {len(files)} files")
    for f in files:
        log(f"  {f}")
    return files, ref


def publish(model_dir: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, dry_run: bool = False, space_id: str | None = None,
            bundle: bool = False, hardware: str = "zerogpu", log=print) -> dict[str, Any]:
    """Validate, write the card, and upload the model (and the Space that serves it from the Hub).

    Args:
        model_dir: the model folder.
        repo_id: target model repo, ``user/name``.
        private: create the repos private (an existing repo keeps its visibility).
        revision: branch to push the model to (created if missing); default ``main``.
        commit_message: commit message for the model upload.
        dry_run: validate and list, but write nothing and make no network call.
        space_id: also push the Gradio Space ``user/space``, pinned to the model commit just uploaded.
        bundle: put the model files into the Space too (a Space that must start without the Hub).
        hardware: the Space's hardware, ``"zerogpu"`` (free accounts) or ``"cpu"`` (a paid plan): its requirements,
            Python version and the hardware asked for when the Space is created (docs/space.md).
        log: where progress lines go.

    Returns:
        ``{"model_files": [...], "space_files": [...], "space_model": ..., "model_commit": ..., "space_commit": ...}``
        (``model_commit``: the commit's URL).

    Raises:
        UploadRefused: the folder fails validation, or there is no token.
    """
    model_dir = Path(model_dir)
    bundle_as = model_dir.resolve().name if bundle else None  # the bundled folder keeps the model folder's name
    caption = validate_model(model_dir)
    log(f"validated {model_dir}: example caption {caption!r}")
    files, left_out = model_files(model_dir)
    if left_out:
        log(f"left out of the upload: {', '.join(left_out)}")
    out: dict[str, Any] = {"model_files": files, "space_files": [], "space_model": None, "model_commit": None,
                           "space_commit": None}
    with tempfile.TemporaryDirectory(prefix="storyteller-upload-") as tmp:
        tmp = Path(tmp)
        card = _render_card(model_dir, files, repo_id, dry_run, tmp)
        log(f"model card: {card.stat().st_size} bytes" + (" (rendered in a temporary copy)" if dry_run else f" -> {card}"))
        branch = f" (branch {revision})" if revision else ""
        log(f"{'would upload' if dry_run else 'uploading'} to model repo {repo_id}{branch}:")
        for f in files:
            log(f"  {f}  ({(card if f == CARD else model_dir / f).stat().st_size / 1024:.1f} KiB)")
        if dry_run:
            if space_id:
                out["space_files"], out["space_model"] = _stage_space_logged(
                    card.parent, repo_id, space_id, tmp / "space", None, bundle_as, dry_run, log, hardware)
            log("dry run: nothing uploaded")
            return out

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload Neural Storyteller model from {model_dir.name}",
                                 allow_patterns=files)
        out["model_commit"] = getattr(info, "commit_url", str(info))
        log(f"model: {out['model_commit']}")
        if space_id:  # staged now: it is pinned to the commit the model upload just made (CommitInfo.oid)
            out["space_files"], out["space_model"] = _stage_space_logged(
                model_dir, repo_id, space_id, tmp / "space", info.oid, bundle_as, dry_run, log, hardware)
            # the hardware is asked for when the Space is created; an existing Space keeps its own (Settings)
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private or None, exist_ok=True,
                            space_hardware=HARDWARE[hardware])
            info = api.upload_folder(repo_id=space_id, folder_path=str(tmp / "space"), repo_type="space",
                                     commit_message=f"Neural Storyteller app serving {out['space_model']}")
            out["space_commit"] = getattr(info, "commit_url", str(info))
            log(f"space: {out['space_commit']}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 refused or failed).

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
    """
    p = argparse.ArgumentParser(description="Publish a Neural Storyteller model (and its Space) to the Hugging Face Hub.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="folder with config.json, model.safetensors, vocab.json")
    p.add_argument("--repo-id", required=True, help="model repo, e.g. me/storyteller-flickr8k-lite0")
    p.add_argument("--private", action="store_true", help="create the repo(s) private")
    p.add_argument("--revision", default=None, help="branch to push the model to (created if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true", help="validate and list what would be uploaded; no network, no writes")
    p.add_argument("--space-id", default=None,
                   help="also push the Gradio Space, e.g. me/neural-storyteller: it downloads the model from --repo-id "
                        "at the commit just uploaded")
    p.add_argument("--bundle", action="store_true",
                   help="with --space-id: put the model files into the Space too, for a Space that must start "
                        "without the Hub")
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="zerogpu",
                   help="with --space-id: the Space's hardware: zerogpu (default; what a free account can host: "
                        "Python 3.12, PyTorch 2.8-2.11 and `spaces` in its requirements) or cpu (CPU Basic, a paid "
                        "plan); see docs/space.md")
    args = p.parse_args(argv)
    if args.bundle and not args.space_id:
        p.error("--bundle goes with --space-id")
    try:
        publish(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, dry_run=args.dry_run, space_id=args.space_id, bundle=args.bundle,
                hardware=args.hardware)
    except UploadRefused as e:
        print(f"hub_upload: refusing to upload: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # HTTP errors from the Hub: one line, not a traceback
        print(f"hub_upload: upload failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
