"""Package a trained model for shipping: float16 weights, recommended decoding settings, model card.

    python -m train bundle --model runs/flickr8k-lite0/fit/model --out models/flickr8k-lite0 \
        --beam 3 --alpha 0.5 --no-repeat-ngram-size 3

The result is a Hub-layout folder (config.json, model.safetensors, vocab.json, README.md, plus the
source's loss/metric curves; weights over 20 MB go in shards, model-0000i-of-0000N.safetensors with the
Hub's model.safetensors.index.json, so no file is too big for a repository) that `storyteller.load`, `app.py` and `hub_upload.py` take as is. The
decoding settings go into ``config["extra"]["decoding"]``; the app and the CLI use them as their
defaults. Weights are stored as float16 (half the size) and loaded back into a float32 model, so
evaluate the *bundled* folder (``python -m train evaluate --model OUT ... --write-to-model``) to put
figures that describe exactly what ships into its card.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from storyteller.card import public_dataset, published_local_paths, write_model_card
from storyteller.fileio import write_json_atomic
from storyteller.decoders import load_decoder
from storyteller.loading import CONFIG_FILE, MAX_SHARD_BYTES, VOCAB_FILE, save_weights
from storyteller.decoding_settings import BAD_ENDINGS_HELP, MAX_LEN_LIMIT, parse_bad_endings
from storyteller.decoding_settings import validate_decoding as check_decoding

CARRIED_FILES = ("loss_curve.png", "metric_curve.png")
# The recommended decoding settings a bundle may carry: (lowest, highest) allowed value, None = unbounded.
MAX_DECODING_STEPS = MAX_LEN_LIMIT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train bundle", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="trained model folder (fit's RUN_DIR/model)")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty or absent)")
    p.add_argument("--beam", type=int, default=3, help="recommended beam size")
    p.add_argument("--alpha", type=float, default=0.0, help="recommended length-normalisation alpha")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="recommended n-gram blocking (0: off)")
    p.add_argument("--max-len", type=int, default=20,
                   help=f"recommended most decoding steps (1..{MAX_DECODING_STEPS}): a caption cut at N steps has N "
                        "words, one that ends itself at most N-1")
    p.add_argument("--bad-endings", default=None, help=BAD_ENDINGS_HELP + " (unset: the model's own)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored weight dtype")
    return p


def validate_decoding(decoding: dict) -> None:
    """Check recommended decoding settings before they are written into a bundle
    (``storyteller.decoding_settings.validate_decoding``, the check ``load()`` applies too; unknown keys refused).

    Raises:
        ValueError: an unknown key or a value out of range, naming it.
    """
    check_decoding(decoding)


def bundle(model_dir: str | Path, out: str | Path, decoding: dict, dtype: str = "float16",
           max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a shippable copy of ``model_dir`` to ``out``.

    Args:
        model_dir: a folder written by ``save_pretrained`` (either decoder) (loaded strictly first).
        out: the new folder; refused if it exists and is not empty.
        decoding: recommended decoding settings (beam_size, alpha, no_repeat_ngram_size, max_len);
            checked by ``validate_decoding``.
        dtype: ``float16`` or ``float32`` weights.
        max_shard_bytes: weights over this many bytes are written in shards (``storyteller.loading.save_weights``).
    """
    validate_decoding(decoding)
    model_dir, out = Path(model_dir), Path(out)
    model = load_decoder(model_dir)  # validates config, weights and vocabulary together
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    own = ((config.get("extra") or {}).get("decoding") or {}).get("bad_endings")
    if "bad_endings" not in decoding and own:  # keep the model's own rule (SCST models) unless told otherwise
        decoding = {**decoding, "bad_endings": list(own)}
    config["extra"] = {**(config.get("extra") or {}), "decoding": decoding}
    if "dataset" in config["extra"]:  # its name or Hub id, never the training machine's path
        config["extra"]["dataset"] = public_dataset(config["extra"]["dataset"])
    write_json_atomic(out / CONFIG_FILE, config, indent=2, sort_keys=True)
    shutil.copy2(model_dir / VOCAB_FILE, out / VOCAB_FILE)
    state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    save_weights(state, out, max_shard_bytes)
    for name in CARRIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    load_decoder(out)  # the bundle loads strictly, or we fail here rather than in the app
    write_model_card(out)
    leaks = published_local_paths(out)
    if leaks:  # a field this code does not know about: better refuse than ship a machine's folders
        raise ValueError(f"{out}: published files name local paths {leaks}; remove them before shipping")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    decoding = {"beam_size": args.beam, "alpha": args.alpha, "no_repeat_ngram_size": args.no_repeat_ngram_size,
                "max_len": args.max_len}
    try:
        bad_endings = parse_bad_endings(args.bad_endings)
        if bad_endings is not None:
            decoding["bad_endings"] = bad_endings
        validate_decoding(decoding)
    except ValueError as e:
        parser.error(str(e))
    out = bundle(args.model, args.out, decoding, args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"bundle: {out} ({size / 2**20:.1f} MiB): " + ", ".join(sorted(f.name for f in out.iterdir())))
    print(f"next: python -m train evaluate --model {out} ... --write-to-model  (figures of exactly what ships)")


if __name__ == "__main__":
    main()
