"""One way to load a captioner: ``load(name) -> Captioner``, a decoder plus the CNN it was trained with.

    from storyteller.captioner import load
    captioner = load("models/flickr8k-lite0-ensemble")      # a local folder in the Hub layout, or a Hub repo id
    captioner("photo.jpg")                          # -> "a dog runs through the grass"
    results = captioner.caption([img1, img2], beam_size=5)   # one batch: greedy + beam, log-probs, timings

Which model ``load()`` picks, first match wins: the ``name_or_path`` argument; the environment
variable ``STORYTELLER_MODEL``; the bundled folder ``models/flickr8k-lite0-ensemble/`` at the repository root.
A Hub repo is fetched with ``snapshot_download`` (so ``HF_HUB_OFFLINE=1`` uses the local cache) and
then loaded exactly like a folder: finding, checking and reading the files is ``storyteller.loading``. The backbone and its preprocessing come from the model's
``config.json`` (``create_backbone(config["backbone"])``), so live features match the features the
decoder was trained on. Every failure to load raises :class:`ModelLoadError` saying what to do.

Example::

    python -c "from storyteller.captioner import load; print(load('models/flickr8k-lite0-ensemble')('examples/1130369873_d80a1aa59c.jpg'))"
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .confidence import CalibrationError, Calibrator
from .decoding import Caption, beam_search, greedy_and_beam_search, greedy_search
from .precision import use_precision
from .decoding_settings import DECODING_DEFAULTS, check_beam, decoding_hints, end_allowed_from
from .images import ImageSource, image_warnings, load_image
from .decoders import HubDecoder, load_decoder
# Loading lives in storyteller.loading; these names stay importable from here, where users found them.
from .loading import (DEFAULT_MODEL_DIR, MODEL_ENV_VAR, MODEL_EXAMPLES_GLOB, MODEL_FILES, OPTIONAL_MODEL_FILES,
                      ModelLoadError, check_model_folder, check_weights_file, default_model,
                      model_label, resolve_model_dir)

__all__ = ["Captioner", "CaptionResult", "ModelLoadError", "load", "default_model", "DEFAULT_MODEL_DIR",
           "MODEL_ENV_VAR", "MODEL_FILES", "OPTIONAL_MODEL_FILES", "MODEL_EXAMPLES_GLOB", "DECODING_DEFAULTS",
           "check_weights_file", "model_label", "decoding_hints"]


@dataclass
class CaptionResult:
    """Greedy and beam captions of one image, with the timings of the batch it was captioned in.

    ``beam`` holds the ``n_best`` best beam hypotheses, best first (empty when beam search was off);
    ``greedy`` is None when greedy search was off. ``timings_ms`` has ``preprocess`` (decode +
    resize + normalise), ``backbone``, ``search`` (greedy and beam search, run in one pass when both
are on) and ``total``, for the whole batch of
    ``batch_size`` images. ``warnings`` says why the caption may be a guess (a tiny or nearly
    uniform photo; see ``storyteller.images.image_warnings``).
    """

    greedy: Caption | None
    beam: list[Caption]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def best(self) -> Caption:
        """The beam caption if beam search ran, else the greedy one."""
        return self.beam[0] if self.beam else self.greedy  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"greedy": {...} | None, "beam": [{...}], "timings_ms": {...}}``; an attention
        decoder's maps come as nested lists (words x h x w)."""
        return {"greedy": _caption_dict(self.greedy) if self.greedy else None,
                "beam": [_caption_dict(c) for c in self.beam],
                "timings_ms": dict(self.timings_ms), "batch_size": self.batch_size, "warnings": list(self.warnings)}


def _caption_dict(c: Caption) -> dict[str, Any]:
    d = asdict(c)
    if c.attention is None:
        d.pop("attention")
    else:
        d["attention"] = [[[round(float(v), 4) for v in row] for row in m] for m in c.attention.tolist()]
    return d


class Captioner:
    """A caption decoder (Show-and-Tell, or Show-Attend-Tell over the feature grid) with the frozen
    backbone (and preprocessing) it was trained on.

    Build it with :func:`load`. Captioning runs under ``torch.inference_mode`` and changes no state,
    so one Captioner can serve concurrent requests.

    Args:
        model: the decoder, with its vocabulary attached.
        backbone: a ``storyteller.backbones.Backbone`` matching ``model.backbone``.
        source: where the model came from (folder or repo id), for display.
        revision: the Hub revision asked for, if any.
        model_dir: the local folder holding the model files (a Hub snapshot for repo ids).
        calibrator: the model's confidence calibration (``storyteller.confidence``); None: captions carry no
            confidence.
    """

    def __init__(self, model: HubDecoder, backbone: torch.nn.Module, source: str, revision: str | None = None,
                 model_dir: str | Path | None = None, calibrator: Calibrator | None = None):
        if getattr(backbone, "feature_dim", model.feature_dim) != model.feature_dim:
            raise ModelLoadError(f"{source}: backbone gives {backbone.feature_dim}-d features but the decoder "
                                 f"expects {model.feature_dim}")
        self.model, self.backbone = model.eval(), backbone
        self.transform = backbone.transform
        self.source, self.revision = source, revision
        self.model_dir = Path(model_dir) if model_dir else None
        self.decoding = {**DECODING_DEFAULTS, **decoding_hints(model.extra)}
        # an attention decoder reads the backbone's feature grid, a pooled one its pooled vector
        self.has_attention = bool(getattr(model, "has_attention", False))
        self.calibrator = calibrator

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def info(self) -> dict[str, Any]:
        """What the model is: source, backbone, sizes, and its recorded evaluation figures."""
        spec = self.backbone.spec if hasattr(self.backbone, "spec") else (self.model.backbone or {})
        m = self.model
        return {"model": self.source, "model_name": model_label(self.source), "revision": self.revision,
                "backbone": spec.get("name"),
                "backbone_weights": spec.get("weights"), "feature_dim": m.feature_dim, "vocab_size": m.vocab_size,
                **decoder_summary(m), "has_attention": self.has_attention,
                # an ensemble's members, each as above (None: one decoder)
                "members": [decoder_summary(x) for x in m.members] if hasattr(m, "members") else None,
                "weights": getattr(m, "shares", None),  # an ensemble's shares (None: equal, or one decoder)
                "dataset": (m.extra or {}).get("dataset"), "metrics": (m.extra or {}).get("metrics") or {},
                "evaluations": _read_evaluations(self.model_dir), "decoding": dict(self.decoding),
                "precision": self.precision}

    @property
    def precision(self) -> str:
        """How the decoder's step computes its products (``storyteller.precision``): fp32, bf16 or int8."""
        return self.model.precision

    @property
    def draft_size(self) -> int:
        """The JPEG draft size :meth:`load_image` uses by default: the backbone's resize size (0: none)."""
        return int(getattr(self.transform, "preprocessing", {}).get("resize", 0))

    def load_image(self, image: ImageSource, draft_size: int | None = None) -> Image.Image:
        """Decode one input exactly as :meth:`caption` does (``storyteller.images.load_image``).

        Args:
            image: a PIL image, path, bytes or binary file.
            draft_size: let JPEG decoding shrink big photos (2/4/8x, in the DCT) while both sides stay
                >= this. None: :attr:`draft_size`, the backbone's resize size (photos under twice that
                are decoded in full). 0: always decode in full, as a feature cache does. Measured
                with efficientnet_lite0 on 10 Flickr8k photos upscaled 2x, 4x and 8x (up to 4000x4000):
                feature cosine to the full decode 0.9969-0.9994 (mean 0.998), where merely re-saving
                the originals at JPEG quality 75 instead of 92 gives 0.96 on average (0.92 at worst);
                preprocessing a 4000x2664 JPEG takes 15 ms instead of 92 ms.

        Raises:
            ImageError: not a usable image.
        """
        if draft_size is None:
            draft_size = self.draft_size
        return load_image(image, draft_size=draft_size or None)

    @torch.inference_mode()
    def features(self, images: Sequence[ImageSource], draft_size: int | None = None,
                 timings: dict[str, float] | None = None) -> torch.Tensor:
        """The backbone features :meth:`caption` feeds the decoder: :meth:`load_image`, then ``Backbone.encode``.

        Args:
            images: PIL images, paths, bytes or binary files.
            draft_size: as in :meth:`load_image`.
            timings: if given, receives ``"preprocess"`` (decode + resize + normalise) and ``"backbone"`` in ms.

        Returns:
            (len(images), feature_dim) float32 tensor on the model's device; for an attention decoder
            the grids, (len(images), h, w, feature_dim).

        Raises:
            ImageError: an input is not a usable image.
        """
        timings = {} if timings is None else timings
        pils, _ = self._load_all(images, draft_size, timings)
        features = self.backbone.encode(pils, timings=timings, grid=self.has_attention)
        timings["preprocess"] += timings.pop("decode")
        return features

    def _load_all(self, images: Sequence[ImageSource], draft_size: int | None,
                  timings: dict[str, float]) -> tuple[list[Image.Image], list[list[str]]]:
        t0 = time.perf_counter()
        pils = [self.load_image(im, draft_size) for im in images]
        notes = [image_warnings(p) for p in pils]
        timings["decode"] = (time.perf_counter() - t0) * 1e3
        return pils, notes

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for (B, 3, crop, crop) pixels made by :attr:`transform`: the backbone's
        pooled features (B, feature_dim), or for an attention decoder its grids (B, h, w, feature_dim)."""
        pixels = pixels.to(self.backbone.device)
        return self.backbone.forward_grid(pixels)[1] if self.has_attention else self.backbone(pixels)

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageSource], beam_size: int | None = None, max_len: int | None = None,
                alpha: float | None = None, n_best: int = 1, greedy: bool = True, beam: bool = True,
                no_repeat_ngram_size: int | None = None, draft_size: int | None = None) -> list[CaptionResult]:
        """Caption a list of images in one batch.

        Args:
            images: PIL images, paths, bytes or binary files (each goes through ``load_image``).
            beam_size: beam width (default: the model's recommended, else DECODING_DEFAULTS' 3).
            max_len: most decoder steps per caption, ``<end>`` included (default 20).
            alpha: beam length-normalisation exponent (0 ranks by raw log-probability).
            n_best: beam hypotheses returned per image (1..beam_size).
            greedy: run greedy search.
            beam: run beam search.
            no_repeat_ngram_size: forbid repeating n-grams of this size (0: off).
            draft_size: JPEG draft decoding, as in :meth:`load_image` (None: the backbone's resize
                size; 0: always decode in full, exactly as a feature cache does).

        Returns:
            one :class:`CaptionResult` per image, in input order.

        Raises:
            ImageError: an input is not a usable image (nothing is captioned then).
            ValueError: bad decoding settings.
        """
        if len(images) == 0:
            return []
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        pils, notes = self._load_all(images, draft_size, timings)
        features = self.backbone.encode(pils, timings=timings, grid=self.has_attention)  # = self.features(images)
        timings["preprocess"] += timings.pop("decode")
        timings["total"] = (time.perf_counter() - t0) * 1e3  # so far; caption_features adds the search
        return self.caption_features(features, beam_size=beam_size, max_len=max_len, alpha=alpha, n_best=n_best,
                                     greedy=greedy, beam=beam, no_repeat_ngram_size=no_repeat_ngram_size,
                                     warnings=notes, timings=timings)

    @torch.inference_mode()
    def caption_features(self, features: torch.Tensor, beam_size: int | None = None, max_len: int | None = None,
                         alpha: float | None = None, n_best: int = 1, greedy: bool = True, beam: bool = True,
                         no_repeat_ngram_size: int | None = None, warnings: Sequence[list[str]] | None = None,
                         timings: dict[str, float] | None = None) -> list[CaptionResult]:
        """The searches of :meth:`caption` on features already computed (:meth:`features`, :meth:`encode_pixels`).

        Args:
            features: (B, feature_dim), or (B, h, w, feature_dim) grids for an attention decoder.
            beam_size, max_len, alpha, n_best, greedy, beam, no_repeat_ngram_size: as in :meth:`caption`.
            warnings: per image, the notes of ``image_warnings`` (default none).
            timings: the batch's timings so far (ms); ``search`` is added and ``total`` grows by it.

        Returns:
            one :class:`CaptionResult` per row of ``features``.

        Raises:
            ValueError: bad decoding settings.
        """
        d = self.decoding
        beam_size = d["beam_size"] if beam_size is None else int(beam_size)
        max_len = d["max_len"] if max_len is None else int(max_len)
        alpha = d["alpha"] if alpha is None else float(alpha)
        ngram = d["no_repeat_ngram_size"] if no_repeat_ngram_size is None else int(no_repeat_ngram_size)
        if not (greedy or beam):
            raise ValueError("nothing to do: greedy and beam are both off")
        if beam:
            check_beam(beam_size, n_best)
        B = features.shape[0]
        if B == 0:
            return []
        timings = {} if timings is None else timings
        notes = list(warnings) if warnings is not None else [[] for _ in range(B)]
        min_len = end_allowed_from(d["min_len"], max_len)

        t2 = time.perf_counter()
        kw = dict(max_len=max_len, no_repeat_ngram_size=ngram, min_len=min_len, bad_endings=d["bad_endings"])
        if greedy and beam:  # one pass: one decoder call per step for the rows of both searches
            greedy_caps, beam_caps = greedy_and_beam_search(self.model, features, beam_size=beam_size, alpha=alpha,
                                                            n_best=n_best, **kw)
        elif greedy:
            greedy_caps, beam_caps = greedy_search(self.model, features, **kw), [[] for _ in range(B)]
        else:
            greedy_caps = [None] * B
            beam_caps = beam_search(self.model, features, beam_size=beam_size, alpha=alpha, n_best=n_best, **kw)
        search = (time.perf_counter() - t2) * 1e3
        timings.update(search=search, total=timings.get("total", 0.0) + search)
        results = [CaptionResult(g, b, dict(timings), B, w) for g, b, w in zip(greedy_caps, beam_caps, notes)]
        if self.calibrator is not None:
            t3 = time.perf_counter()
            self.calibrator.annotate(features, results)
            confidence = (time.perf_counter() - t3) * 1e3
            for r in results:
                r.timings_ms.update(confidence=confidence, total=r.timings_ms["total"] + confidence)
        return results

    def attention_figure(self, image: ImageSource, caption: Caption, panel_width: int = 200, columns: int = 5
                         ) -> Image.Image:
        """Where the model looked for each word of ``caption``: one panel per word (``storyteller.heatmap``).

        Args:
            image: the photo the caption is of: a PIL image (as returned by :meth:`load_image`), or a path, bytes
                or binary file, decoded as :meth:`caption` decodes it.
            caption: a caption of an attention decoder (its ``attention`` is set).
            panel_width: width of each word's panel in pixels.
            columns: panels per row.

        Raises:
            ValueError: the caption has no attention maps (a pooled decoder) or no words.
        """
        from .heatmap import attention_figure

        if caption.attention is None:
            raise ValueError(f"{model_label(self.source)} is a pooled model (no decoder of it looks over the grid): it "
                             "has no attention maps to show; use a Show-Attend-Tell model or an ensemble holding one")
        if not isinstance(image, Image.Image):
            image = self.load_image(image)
        words = [self.model.vocab.itos[t] for t in caption.tokens]
        return attention_figure(image, words, caption.attention, self.backbone.spec["preprocessing"],
                                panel_width=panel_width, columns=columns)

    def warmup(self) -> float:
        """Caption one blank image so the first real request does not pay PyTorch's one-off start-up costs.

        Returns:
            the time it took, in ms.
        """
        t = time.perf_counter()
        self.caption([Image.new("RGB", (320, 240), (128, 128, 128))], beam_size=2, max_len=3)
        return (time.perf_counter() - t) * 1e3

    def __call__(self, image: ImageSource, **kwargs: Any) -> str:
        """The best caption of one image (beam search with the default settings).

        Args:
            image: a PIL image, path, bytes or binary file.
            kwargs: passed to :meth:`caption`.
        """
        return self.caption([image], greedy=False, **kwargs)[0].best.text

    def __repr__(self) -> str:
        return (f"Captioner(model={self.source!r}, backbone={self.info['backbone']!r}, "
                f"vocab_size={self.model.vocab_size}, device={self.device})")


def _backbone_name(config: dict[str, Any]) -> str | None:
    spec = config.get("backbone")
    return spec.get("name") if isinstance(spec, dict) else spec


def decoder_summary(model) -> dict[str, Any]:
    """A decoder's type and sizes, for ``Captioner.info``; a size that means nothing for it (an ensemble's: its
    members have their own) is left out, not shown as null."""
    sizes = {k: getattr(model, k, None) for k in ("embed_dim", "hidden_dim", "num_layers")}
    return {"decoder": getattr(model, "decoder_type", "show_and_tell"), **{k: v for k, v in sizes.items() if v is not None}}


def _read_evaluations(model_dir: Path | None) -> list[dict[str, Any]]:
    if model_dir is None:
        return []
    from .card import read_evaluations

    try:
        return read_evaluations(model_dir)
    except (OSError, ValueError) as e:  # unreadable or not JSON: show no figures rather than fail, but say so
        warnings.warn(f"{model_dir}: cannot read evaluation.json ({type(e).__name__}: {e}); showing no evaluations",
                      stacklevel=2)
        return []


def load(name_or_path: str | os.PathLike | None = None, revision: str | None = None,
         device: str | torch.device = "cpu", precision: str | None = None) -> Captioner:
    """Load a captioner: the decoder, its vocabulary, and the backbone named in its config.

    Args:
        name_or_path: a local model folder (``config.json`` + ``model.safetensors`` + ``vocab.json``)
            or a Hub repo id. Default: ``$STORYTELLER_MODEL``, else the bundled
            ``models/flickr8k-lite0-ensemble/``.
        revision: Hub branch, tag or commit to load (repo ids only).
        device: where to run (``"cpu"``, ``"cuda"``...).
        precision: how the decoder's step computes on a CPU: ``fp32``, ``bf16``, ``int8`` or ``auto`` (default:
            ``$STORYTELLER_PRECISION``, else ``auto``: a fixed rule by what this CPU supports, int8 where it
            runs; see ``storyteller.precision``). A GPU runs fp32.

    Returns:
        a ready :class:`Captioner` in eval mode.

    Raises:
        ModelLoadError: the model cannot be found, downloaded or loaded; the message says why.
    """
    source = str(name_or_path) if name_or_path is not None else default_model()
    model_dir = resolve_model_dir(source, revision)
    try:
        return _load_folder(model_dir, source, revision, device, precision)
    except ModelLoadError:
        raise
    except Exception as e:  # anything else a broken model folder raises is still one clear error, not a traceback
        raise ModelLoadError(f"{source}: cannot load the model: {type(e).__name__}: {e}") from e


def _load_folder(model_dir: Path, source: str, revision: str | None, device: str | torch.device,
                 precision: str | None) -> Captioner:
    """:func:`load`'s work once the folder is found; each expected failure is a ModelLoadError saying what to do."""
    from .backbones import create_backbone

    config = check_model_folder(model_dir, source)
    try:
        model = load_decoder(str(model_dir))
    except (ValueError, OSError, TypeError) as e:  # vocab/config/weights mismatch, missing file, bad config keys, NaN
        raise ModelLoadError(f"{source}: cannot load the decoder: {e}") from None
    except Exception as e:  # safetensors' own SafetensorError on a file corrupt past its header
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"{source}: its weights are corrupt ({e}); download or export the model again") from None
    try:
        backbone = create_backbone(config["backbone"], device=device)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{source}: cannot build its backbone {_backbone_name(config)!r}: {e}") from None
    model = model.to(device).eval()
    try:
        use_precision(model, precision)
    except ValueError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    model.products()  # the step's products made now, not at the first caption
    try:
        calibrator = Calibrator.load(model_dir)
    except CalibrationError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    return Captioner(model, backbone, source=source, revision=revision, model_dir=model_dir, calibrator=calibrator)
