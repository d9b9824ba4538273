"""Join trained models into one ensemble model folder: the searches decode it as one decoder.

    python -m train ensemble --models models/flickr8k-lite0-scst runs/att-scst-xe/avg --out runs/ensemble
    python -m train bundle --model runs/ensemble --out models/NAME --beam 3 --alpha 1.0 --bad-endings standard
    python -m train evaluate --model models/NAME --features feats/ --split validation --write-to-model

The members must share the vocabulary and the backbone (the same features). The next-word distribution is the
weighted mean of the members' probabilities (``storyteller.decoders.ensemble``). Decoding settings come with
``train bundle``; figures with ``train evaluate`` on a grid cache when a member attends.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from storyteller.card import write_model_card
from storyteller.decoders import Ensemble, load_decoder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train ensemble", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="two or more model folders (or Hub repo ids)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="each model's share of the mixture, in --models order (default: equal shares)")
    p.add_argument("--out", required=True, help="the new model folder (must not exist, or be empty)")
    return p


def check_members(models: list, names: list[str]) -> None:
    """Refuse members that cannot be decoded as one: ensembles, another vocabulary, another backbone."""
    first = models[0]
    for m, name in zip(models, names):
        if isinstance(m, Ensemble):
            raise ValueError(f"{name} is an ensemble already; give its members")
        if m.vocab != first.vocab:
            raise ValueError(f"{name}'s vocabulary differs from {names[0]}'s: the members must share one vocabulary")
        if (m.backbone or {}) != (first.backbone or {}) or m.feature_dim != first.feature_dim:
            raise ValueError(f"{name}'s backbone differs from {names[0]}'s: the members must read the same features")


def build_ensemble(models: list, names: list[str], weights: list[float] | None) -> Ensemble:
    """One ``Ensemble`` holding ``models``' weights, its metadata saying what it was built from."""
    check_members(models, names)
    members = [{k: v for k, v in m.init_arguments().items() if k not in ("backbone", "extra")} for m in models]
    first = models[0]
    built_from = [{"model": Path(n).name, "decoder": m.decoder_type,
                   "method": (m.extra.get("training") or {}).get("method")} for m, n in zip(models, names)]
    shares = "equal shares" if weights is None else "shares " + ", ".join(f"{w:g}" for w in weights)
    training = {"method": "an ensemble (the mean of the members' next-word probabilities, " + shares + ") of "
                          + "; ".join(f"{b['model']} ({b['decoder']}: {b['method'] or 'trained'})" for b in built_from),
                "members": built_from}
    extra = {k: v for k, v in first.extra.items() if k == "dataset"}
    ensemble = Ensemble(first.vocab_size, first.feature_dim, members, weights, backbone=first.backbone,
                        extra={**extra, "training": training})
    for target, source in zip(ensemble.members, models):
        target.load_state_dict(source.state_dict())
    ensemble.vocab = first.vocab
    return ensemble.eval()


def main(argv: list[str] | None = None) -> Path:
    """``python -m train ensemble``: see the module docstring."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"ensemble: {out} is not empty; remove it or choose another --out")
    if len(args.models) < 2:
        sys.exit("ensemble: give at least two --models")
    try:
        models = [load_decoder(name) for name in args.models]
        ensemble = build_ensemble(models, args.models, args.weights)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"ensemble: {e}")
    ensemble.save_pretrained(out)
    write_model_card(out)
    print(f"ensemble: {', '.join(args.models)} -> {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
