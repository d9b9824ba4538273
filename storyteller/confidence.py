"""How sure the model is of a caption: a calibrated probability that the caption is good, and its badge.

    calibrator = Calibrator.load(model_dir)              # None: the model has no calibration.json
    calibrator.annotate(features, results)               # sets Caption.confidence on every caption
    badge(0.72)                                          # ("likely right", "likely-right")
    badge(None)                                          # None: no calibrator, no verdict (never a made-up one)

``Caption.confidence`` is the estimated probability that the caption is *good* by the criterion its model's
calibration states (``calibration.json``: ``criterion``), fitted and judged on validation photos by
``python -m train calibrate`` (docs/results.md, "How sure is it?"). It is a logistic function of a few signals
(``SIGNALS``), each measured for what it adds there:

- ``norm_log_prob``: the caption's log-probability over the GNMT length penalty ((5 + n) / 6), n its tokens
  with ``<end>``: what the search already ranks by (alpha 1), independent of the search's own alpha.
- ``consensus``: CIDEr-D of the caption against the human captions of the ``k`` training photos whose pooled
  features are nearest the photo's (cosine, after a PCA fitted on the training features; Devlin et al. 2015's
  consensus). A photo like many the model saw, described as people described those, is a safer bet.
- ``words``: the caption's length in words.

The neighbours (their projected features, their captions as word ids) and the document frequencies of the
training captions live in ``calibration.safetensors`` beside ``calibration.json``; both are written by
``train calibrate`` and are optional model files: a model without them shows no confidence.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cider import CaptionReward
from .backbones import pooled

CALIBRATION_FILE = "calibration.json"
NEIGHBOURS_FILE = "calibration.safetensors"
FORMAT, VERSION = "storyteller-calibration", 1

# (lowest confidence, label, css key), highest first: the first row whose threshold the confidence reaches.
BADGES: tuple[tuple[float, str, str], ...] = (
    (0.5, "likely right", "likely-right"),
    (0.2, "unsure", "unsure"),
    (0.0, "likely wrong", "likely-wrong"),
)
MEANING = ("The chance that every word of the caption that names a thing, action or colour is one people also "
           "used for this kind of photo, estimated from how sure the model was and how photos like it were "
           "described; fitted on photos the model never trained on.")


def badge(confidence: float | None) -> tuple[str, str] | None:
    """The (label, css key) for a confidence in [0, 1], or None when there is none.

    Args:
        confidence: ``Caption.confidence``.
    """
    if confidence is None:
        return None
    for threshold, label, key in BADGES:
        if confidence >= threshold:
            return label, key
    return BADGES[-1][1:]


class CalibrationError(ValueError):
    """A model's calibration files are unreadable or do not fit the model."""


def sigmoid(logit: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-logit), the logit clipped to +-60 (no overflow)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0)))


def logistic(rows: np.ndarray, weights: Sequence[float], intercept: float, mean: Sequence[float],
             scale: Sequence[float]) -> np.ndarray:
    """A logistic regression on standardised columns: (S, k) values -> (S,) probabilities."""
    z = (np.asarray(rows, dtype=np.float64) - np.asarray(mean)) / np.asarray(scale)
    return sigmoid(intercept + z @ np.asarray(weights, dtype=np.float64))


def signal_rows(signals: Sequence[str], captions: Sequence[Any], consensus: Sequence[float]) -> np.ndarray:
    """(S, len(signals)): each caption's named signals (``SIGNALS``), given its consensus."""
    return np.array([[SIGNALS[s](c, x) for s in signals] for c, x in zip(captions, consensus)],
                    dtype=np.float64).reshape(len(captions), len(signals))


def length_penalty_1(tokens: int) -> float:
    """GNMT's length penalty at alpha 1: ((5 + tokens) / 6)."""
    return (5.0 + tokens) / 6.0


def norm_log_prob(log_prob: float, words: int, finished: bool) -> float:
    """A caption's log-probability over the alpha-1 length penalty of its tokens (``<end>`` counted)."""
    return log_prob / length_penalty_1(words + int(finished))


@dataclass
class Neighbours:
    """The training photos a photo is compared with: projected pooled features and their human captions.

    ``mean`` (D,) and ``projection`` (D, d) map a pooled feature to the bank's space; ``bank`` (N, d) holds the
    training photos there, each row of unit length; photo i's captions are ``captions[image_refs[i]:image_refs[i+1]]``
    of the reward's word ids; ``reward`` holds the training captions' document frequencies."""

    mean: torch.Tensor
    projection: torch.Tensor
    bank: torch.Tensor
    captions: list[np.ndarray]
    image_refs: np.ndarray
    reward: CaptionReward
    k: int = 10

    def __post_init__(self):
        # (d, N) float32, made once: converting the float16 bank at every caption cost more than the search's step
        self._bank_t = self.bank.float().T.contiguous()

    def nearest(self, pooled: torch.Tensor) -> np.ndarray:
        """(B, D) pooled features -> (B, k) indices of the nearest training photos, nearest first."""
        if pooled.shape[-1] != self.mean.shape[0]:
            raise CalibrationError(f"the calibration's neighbours have {self.mean.shape[0]}-d features; this model's "
                                   f"backbone gives {pooled.shape[-1]}-d ones")
        q = (pooled.float().cpu() - self.mean) @ self.projection
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = q @ self._bank_t  # (B, N) cosine
        return sim.topk(min(self.k, sim.shape[1]), dim=1).indices.numpy()

    def consensus(self, pooled: torch.Tensor, texts: Sequence[str], photo: Sequence[int]) -> np.ndarray:
        """CIDEr-D of each text against the captions of its photo's ``k`` nearest training photos.

        Args:
            pooled: (B, D) the photos' pooled features.
            texts: S captions.
            photo: (S,) the row of ``pooled`` each caption describes.
        """
        near = self.nearest(pooled)
        refs = [[c for j in near[b] for c in self.captions_of(int(j))] for b in range(near.shape[0])]
        hyps = [self.reward.encode_known(t) for t in texts]
        return self.reward.score(hyps, np.asarray(photo, dtype=np.int64), refs)[0]

    def captions_of(self, image: int) -> list[np.ndarray]:
        return self.captions[self.image_refs[image]:self.image_refs[image + 1]]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays of ``calibration.safetensors`` (captions flattened with their offsets)."""
        words, df_keys, df_counts, _ = self.reward.tables()
        lengths = np.array([len(c) for c in self.captions], dtype=np.int64)
        return {"mean": self.mean.float().contiguous(), "projection": self.projection.float().contiguous(),
                "bank": self.bank.half().contiguous(),
                "caption_words": torch.from_numpy(np.concatenate(self.captions).astype(np.int32)),
                "caption_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
                "image_refs": torch.from_numpy(self.image_refs.astype(np.int64)),
                "df_keys": torch.from_numpy(df_keys.astype(np.int64)),
                "df_counts": torch.from_numpy(df_counts.astype(np.int32))}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], words: list[str], images: int, k: int) -> "Neighbours":
        offsets = t["caption_offsets"].numpy()
        flat = t["caption_words"].numpy().astype(np.int64)
        captions = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        reward = CaptionReward.from_tables(words, t["df_keys"].numpy(), t["df_counts"].numpy(), images)
        return cls(t["mean"].float(), t["projection"].float(), t["bank"], captions, t["image_refs"].numpy(), reward, k)


# signal name -> value from (caption, its consensus): the calibrator's inputs, by name in calibration.json
SIGNALS: dict[str, Callable[[Any, float], float]] = {
    "norm_log_prob": lambda c, consensus: norm_log_prob(c.log_prob, len(c.tokens), c.finished),
    "consensus": lambda c, consensus: float(consensus),
    "words": lambda c, consensus: float(len(c.tokens)),
}


@dataclass
class Calibrator:
    """A logistic calibration: confidence = sigmoid(intercept + sum_j weight_j * (signal_j - mean_j) / scale_j).

    Args:
        signals: the names of its inputs (``SIGNALS``' keys).
        weights, intercept, mean, scale: the fitted logistic model, on standardised signals.
        criterion: what "good" means: ``{"name": ..., "description": ...}``.
        neighbours: the training photos for ``consensus`` (None when no signal needs them).
        validation: the figures ``train calibrate`` measured (cross-validated halves), for the card and docs.
    """

    signals: list[str]
    weights: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]
    criterion: dict[str, str]
    neighbours: Neighbours | None = None
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise CalibrationError(f"calibration names signals this version does not know: {unknown}")
        if not len(self.signals) == len(self.weights) == len(self.mean) == len(self.scale):
            raise CalibrationError("calibration: signals, weights, mean and scale differ in length")
        if "consensus" in self.signals and self.neighbours is None:
            raise CalibrationError(f"calibration uses 'consensus' but {NEIGHBOURS_FILE} is missing")

    def probability(self, rows: np.ndarray) -> np.ndarray:
        """(S, len(signals)) signal values -> (S,) confidences in [0, 1]."""
        return logistic(rows, self.weights, self.intercept, self.mean, self.scale)

    def annotate(self, features: torch.Tensor, results: Sequence[Any]) -> None:
        """Set ``confidence`` on every caption (greedy and each beam entry) of ``results``, in place.

        Args:
            features: (B, D) pooled features or (B, h, w, D) grids, the rows ``results`` were captioned from.
            results: one ``CaptionResult`` per row of ``features``.
        """
        captions, photo = [], []
        for b, r in enumerate(results):
            for c in ([r.greedy] if r.greedy is not None else []) + list(r.beam):
                captions.append(c)
                photo.append(b)
        if not captions:
            return
        consensus = np.zeros(len(captions))
        if self.neighbours is not None:
            consensus = self.neighbours.consensus(pooled(features), [c.text for c in captions], photo)
        for c, p in zip(captions, self.probability(signal_rows(self.signals, captions, consensus))):
            c.confidence = round(float(p), 4)

    # -- files -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, "criterion": self.criterion, "signals": self.signals,
               "weights": self.weights, "intercept": self.intercept, "mean": self.mean, "scale": self.scale,
               "validation": self.validation}
        if self.neighbours is not None:
            words, _, _, images = self.neighbours.reward.tables()
            out["neighbours"] = {"k": self.neighbours.k, "photos": int(self.neighbours.bank.shape[0]),
                                 "dim": int(self.neighbours.projection.shape[1]), "images": images, "words": words}
        return out

    def save(self, model_dir: str | os.PathLike) -> list[Path]:
        """Write ``calibration.json`` (and ``calibration.safetensors``) into ``model_dir``, each atomically."""
        from safetensors.torch import save_file

        from .fileio import write_json_atomic

        model_dir = Path(model_dir)
        written = []
        if self.neighbours is not None:
            tmp = model_dir / f".{NEIGHBOURS_FILE}.tmp"
            save_file(self.neighbours.tensors(), str(tmp))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # a model file like the others (safetensors creates it private)
            os.replace(tmp, model_dir / NEIGHBOURS_FILE)
            written.append(model_dir / NEIGHBOURS_FILE)
        write_json_atomic(model_dir / CALIBRATION_FILE, self.to_json())
        return written + [model_dir / CALIBRATION_FILE]

    @classmethod
    def load(cls, model_dir: str | os.PathLike | None) -> "Calibrator | None":
        """The calibration of a model folder, or None where it has none.

        Raises:
            CalibrationError: the files are there but unreadable, of another format, or inconsistent.
        """
        if model_dir is None or not (Path(model_dir) / CALIBRATION_FILE).is_file():
            return None
        path = Path(model_dir) / CALIBRATION_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path.name} is not readable JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise CalibrationError(f"{path.name} is not a {FORMAT} v{VERSION} file")
        neighbours = None
        if "neighbours" in data:
            neighbours = _load_neighbours(Path(model_dir) / NEIGHBOURS_FILE, data["neighbours"])
        try:
            return cls(signals=list(data["signals"]), weights=[float(w) for w in data["weights"]],
                       intercept=float(data["intercept"]), mean=[float(m) for m in data["mean"]],
                       scale=[float(s) for s in data["scale"]], criterion=dict(data["criterion"]),
                       neighbours=neighbours, validation=dict(data.get("validation", {})))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CalibrationError):
                raise
            raise CalibrationError(f"{path.name} lacks or garbles {e}") from None


def _load_neighbours(path: Path, meta: dict[str, Any]) -> Neighbours:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CalibrationError(f"{CALIBRATION_FILE} names neighbours but {path.name} is missing")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CalibrationError(f"{path.name} is not a readable safetensors file: {e}") from None
    need = {"mean", "projection", "bank", "caption_words", "caption_offsets", "image_refs", "df_keys", "df_counts"}
    if not need <= set(tensors):
        raise CalibrationError(f"{path.name} lacks {sorted(need - set(tensors))}")
    if tensors["bank"].shape[0] != int(meta["photos"]) or tensors["image_refs"].numel() != int(meta["photos"]) + 1:
        raise CalibrationError(f"{path.name} holds {tensors['bank'].shape[0]} photos; {CALIBRATION_FILE} says {meta['photos']}")
    return Neighbours.from_tensors(tensors, list(meta["words"]), int(meta["images"]), int(meta["k"]))
