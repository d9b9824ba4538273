"""Entry point for the training commands.

    python -m train extract --dataset ../shared/data/flickr8k --backbone efficientnet_lite0 --out feats/
    python -m train fit ...
    python -m train scst --init models/NAME --features feats/ --out runs/scst
    python -m train evaluate ...
    python -m train bundle --model RUN/model --out models/NAME
    python -m train ensemble --models models/A models/B --out runs/ensemble

Each subcommand lives in its own module (train/extract.py, train/fit.py, train/evaluate.py) with a
``main(argv)`` and its own argparse; modules are imported only when their command runs, so one
command's heavy imports or absence never break another.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"extract": "cache pooled CNN features of a captioned-image dataset",
            "fit": "train the caption decoder on a feature cache",
            "scst": "fine-tune a trained model on CIDEr-D (self-critical sequence training)",
            "evaluate": "score a trained model's captions",
            "calibrate": "fit a model's confidence calibration on validation photos",
            "bundle": "package a trained model for shipping (float16, decoding defaults, card)",
            "average": "average the weights of several epochs of a run (checkpoint averaging)",
            "ensemble": "join trained models into one ensemble model (the mean of their probabilities)"}


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv[0]`` to ``train.<command>.main(argv[1:])``.

    Args:
        argv: command line without the program name; defaults to ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: python -m train {" + ",".join(COMMANDS) + "} [options]\n\n" + \
                "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"unknown command {argv[0]!r}\n{usage}")
        print(usage)
        return
    try:
        module = importlib.import_module(f"train.{argv[0]}")
    except ModuleNotFoundError as e:
        if e.name != f"train.{argv[0]}":
            raise  # a missing dependency inside the module: show the real error
        sys.exit(f"command {argv[0]!r} is not available: train/{argv[0]}.py is missing from this checkout")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
