"""Average the weights of several epochs of a run (checkpoint averaging), into a model folder.

    python -m train scst ... --out runs/att-scst --keep-epochs          # keeps RUN_DIR/epochs/epoch_NNN.safetensors
    python -m train average --run runs/att-scst --epochs 14 15 16 --out runs/att-scst/avg-14-16
    python -m train evaluate --model runs/att-scst/avg-14-16 --features feats/ --out eval.json

The mean of the last good epochs' weights often scores a little better than any one of them (the epochs
lie around a minimum; their mean lies nearer it). The architecture, vocabulary and metadata come from
``--model`` (default RUN_DIR/model, the run's exported model). A run still going has no model/ yet: then
they come from the model it started from (its ``--init``), and the card describes the run from its
args.json. ``extra.training.averaged_epochs`` and the card say which epochs were averaged. Pick the epochs
on validation, and say so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from storyteller.card import write_model_card
from storyteller.decoders import load_decoder
from train import scst
from storyteller.decoding_settings import parse_bad_endings
from train.reward import parse_reward_weights
from train.scst import EPOCHS_DIR
from train.trainer import epoch_weights_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train average", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder whose epochs/ holds the epochs' weights (scst --keep-epochs)")
    p.add_argument("--epochs", type=int, nargs="+", required=True,
                   help="the epochs to average (one epoch: its own weights, as a model folder)")
    p.add_argument("--model", default=None,
                   help="model folder giving the architecture, vocabulary and metadata (default: RUN/model, or for a "
                        "run still going the model it started from)")
    p.add_argument("--out", required=True, help="the new model folder (must not exist, or be empty)")
    return p


def average_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the float32 state dicts in ``files`` (same keys and shapes).

    Raises:
        ValueError: files that do not hold the same tensors.
    """
    from safetensors.torch import load_file

    total = None
    for path in files:
        state = load_file(str(path))
        if total is None:
            total = {k: v.double() for k, v in state.items()}
            continue
        if state.keys() != total.keys() or any(state[k].shape != total[k].shape for k in state):
            raise ValueError(f"{path.name} does not hold the same tensors as {files[0].name}")
        for k, v in state.items():
            total[k] += v.double()  # float64 sums: the mean of a few float32 weights, rounded once
    return {k: (v / len(files)).float() for k, v in total.items()}


def source_model(run: Path, model: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model whose architecture, vocabulary and metadata the average takes, and its ``extra.training``:
    ``model`` or RUN/model; for an SCST run still going (no RUN/model), the model it started from, with the
    training the run's args.json describes."""
    args_file = run / "args.json"
    if model is not None or (run / "model").is_dir() or not args_file.is_file():
        found = load_decoder(model or run / "model")
        return found, dict(found.extra.get("training") or {})
    run_args = json.loads(args_file.read_text(encoding="utf-8"))
    if "init" not in run_args or "reward" not in run_args:
        raise ValueError(f"{run} has no model/ and its args.json is not an scst run's; give --model")
    found, init_name = scst.load_init_model(run_args["init"])
    record = scst.training_record(argparse.Namespace(**run_args), init_name, parse_reward_weights(run_args["reward"]),
                                  found.extra)
    # the run validated with its bad-ending rule: the average recommends it, as the run's export would
    endings = [w for w in parse_bad_endings(run_args.get("bad_endings", "none")) if w in found.vocab.stoi]
    if endings:
        found.extra["decoding"] = {**(found.extra.get("decoding") or {}), "bad_endings": endings}
    return found, record


def main(argv: list[str] | None = None) -> Path:
    """``python -m train average``: see the module docstring."""
    parser = build_parser()
    args = parser.parse_args(argv)
    epochs = sorted(set(args.epochs))
    run = Path(args.run)
    files = [epoch_weights_file(run / EPOCHS_DIR, e) for e in epochs]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        sys.exit(f"average: {run / EPOCHS_DIR} has no {', '.join(missing)} (run scst with --keep-epochs)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"average: {out} is not empty; remove it or choose another --out")
    try:
        model, training = source_model(run, args.model)
        model.load_state_dict(average_weights(files))
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"average: {e}")
    extra = {k: v for k, v in model.extra.items() if k != "metrics"}  # one epoch's figures: not this model's
    training["averaged_epochs"] = epochs
    which = f"weights averaged over epochs {', '.join(map(str, epochs))}" if len(epochs) > 1 else f"epoch {epochs[0]}'s weights"
    training["method"] = (training.get("method", "") + f"; {which}").lstrip("; ")
    config = model.init_arguments()
    config["extra"] = {**extra, "training": training}
    averaged = type(model)(**config)
    averaged.load_state_dict(model.state_dict())
    averaged.vocab = model.vocab
    averaged.save_pretrained(out)
    write_model_card(out)
    print(f"average: epochs {epochs} -> {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
