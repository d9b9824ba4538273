"""An ensemble: several trained decoders that the searches see as one (``init_state`` / ``step``).

    python -m train ensemble --models models/flickr8k-lite0-scst RUN/attention-scst --out models/NAME

Each member reads the photo in its own shape (an attention member the grid, a pooled member the grid's mean,
which is the pooled feature) and steps on its own state; the ensemble's next-word distribution is the
weighted mean of the members' probabilities, log p = log sum_i w_i p_i. With an attention member the ensemble
shows where that member looked (the first one). The members share one vocabulary and one backbone.

The Hub layout is every decoder's: ``config.json`` holds each member's own config under ``members`` (their
``extra`` and ``backbone`` live once, at the top), ``model.safetensors`` their weights as ``members.{i}.*``,
``vocab.json`` the shared vocabulary. An ensemble is built from trained models; ``train scst`` can fine-tune its members together
(``forward`` gives the mixture's log-probabilities).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from ..backbones import pooled
from .base import DecoderState, HubDecoder


def member_class(kind: str) -> type[HubDecoder]:
    """The decoder class whose ``decoder_type`` is ``kind``, among the loaded decoders (the registry imports
    them all; reading them here, not from the registry, keeps the registry -> ensemble import one-way)."""
    todo, seen = list(HubDecoder.__subclasses__()), []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    found = [c for c in seen if c.decoder_type == kind and c is not Ensemble]
    if not found:
        raise ValueError(f"an ensemble member names decoder {kind!r}; members can be "
                         f"{sorted({c.decoder_type for c in seen if c is not Ensemble})}")
    return found[0]


class Ensemble(
    HubDecoder,
    PyTorchModelHubMixin,
    library_name="neural-storyteller",
    tags=["image-captioning", "ensemble", "lstm"],
    pipeline_tag="image-to-text",
    license="mit",
):
    """Trained decoders decoded as one: the mean of their next-word probabilities.

    Args:
        vocab_size: number of token ids, shared by every member.
        feature_dim: size of the backbone's feature (each region's, for grids), shared by every member.
        members: each member's ``config.json`` arguments (with its ``decoder``; ``extra`` and ``backbone`` are
            the ensemble's).
        weights: each member's share of the mixture (positive; normalised to sum 1). None: equal shares.
        backbone: the CNN spec, as for ``ShowAndTell``.
        extra: free-form JSON metadata (training, metrics, decoding settings).
        decoder: the model type in ``config.json``; must be ``"ensemble"``.
    """

    decoder_type = "ensemble"

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        members: list[dict[str, Any]],
        weights: list[float] | None = None,
        backbone: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        decoder: str = "ensemble",
    ):
        super().__init__()
        self._init_common(decoder, vocab_size, feature_dim, backbone, extra)
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
            raise ValueError("an ensemble needs a list of at least two member configs")
        given = weights
        weights = [1.0] * len(members) if weights is None else weights
        numbers = isinstance(weights, list) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < math.inf for w in weights)
        if not numbers or len(weights) != len(members) or not math.isfinite(float(sum(weights))):
            raise ValueError(f"weights must be one positive finite number per member ({len(members)}), got {weights!r}")
        built = []
        for i, config in enumerate(members):
            config = {k: v for k, v in config.items() if k not in ("backbone", "extra")}
            # a member config without "decoder" is Show-and-Tell, as for a model folder (registry.DEFAULT_DECODER)
            cls = member_class(config.get("decoder", "show_and_tell"))  # never an Ensemble: no nesting
            if config.get("vocab_size") != vocab_size or config.get("feature_dim") != feature_dim:
                raise ValueError(f"member {i} has vocab_size {config.get('vocab_size')} and feature_dim "
                                 f"{config.get('feature_dim')}; the ensemble has {vocab_size} and {feature_dim}")
            built.append(cls(**config))
        self.members = nn.ModuleList(built)
        self.shares = None if given is None else list(given)  # as config.json gives them (None: equal)
        total = float(sum(weights))
        self.log_shares = [math.log(w / total) for w in weights]  # log w_i, summing to 1 in probability
        # the grid if any member attends; the first attending member's maps are the ensemble's
        self.has_attention = any(m.has_attention for m in built)
        self.attending = next((i for i, m in enumerate(built) if m.has_attention), None)
        self.grid = getattr(built[self.attending], "grid", None) if self.attending is not None else None

    # the precision is the members': set once here, it reaches every member (each packs its own products)
    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = value
        for m in getattr(self, "members", ()):
            m.precision = value

    def products(self) -> tuple:
        """Each member's step products in the ensemble's precision (made once, again after a weight change)."""
        return tuple(m.products() for m in self.members)

    def member_features(self, member: HubDecoder, features: torch.Tensor) -> torch.Tensor:
        """The ensemble's features in ``member``'s shape: grids (B, h, w, D) or regions (B, R, D) stay for an
        attention member; a pooled member gets their mean (B, D), the pooled feature."""
        return features if member.has_attention else pooled(features)  # fp32 even from a float16 grid cache

    def initial_state(self, features: torch.Tensor, products: tuple) -> tuple[DecoderState, ...]:
        """One row per photo: each member's own state."""
        return tuple(m.initial_state(self.member_features(m, features), p) for m, p in zip(self.members, products))

    def init_state(self, features: torch.Tensor, images: torch.Tensor | None = None) -> tuple[DecoderState, ...]:
        state = self.initial_state(features, self.products())
        return state if images is None else tuple(s.select(images).own_photos() for s in state)

    def step(self, tokens: torch.Tensor, state: tuple[DecoderState, ...], products: tuple | None = None,
             return_attention: bool = False):
        """One decoding step of every member: tokens (N,) -> log-probabilities (N, V) of the mixture, the new
        state, and with ``return_attention`` the attending member's weights (N, R)."""
        P = products if products is not None else self.products()
        logps, new, alpha = [], [], None
        for i, (m, s, p) in enumerate(zip(self.members, state, P)):
            if i == self.attending:
                logp, s, alpha = m.step(tokens, s, products=p, return_attention=True)
            else:
                logp, s = m.step(tokens, s, products=p)
            logps.append(logp)
            new.append(s)
        # rounding can put a near-certain word a hair above 0, which a log-probability never is (beam search's
        # early stop relies on it)
        logp = self.mix(logps).clamp_(max=0.0)
        return (logp, tuple(new), alpha) if return_attention else (logp, tuple(new))

    def mix(self, logps: list[torch.Tensor]) -> torch.Tensor:
        """The members' log-probabilities (each (N, V)) -> the mixture's, log sum_i w_i p_i (N, V)."""
        return torch.logsumexp(torch.stack([lp + share for lp, share in zip(logps, self.log_shares)]), 0)

    def select_state(self, state: tuple[DecoderState, ...], rows: torch.Tensor) -> tuple[DecoderState, ...]:
        return tuple(s.select(rows) for s in state)

    def scatter_state(self, state: tuple[DecoderState, ...], rows: torch.Tensor, sub: tuple[DecoderState, ...]
                      ) -> tuple[DecoderState, ...]:
        return tuple(s.scatter(rows, x) for s, x in zip(state, sub))

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probabilities of the mixture, with ``ShowAndTell.forward``'s contract, for
        fine-tuning the members together (``train scst --init`` an ensemble): every member runs its own forward
        and the result is log sum_i w_i p_i (N, V), already normalised, so a cross-entropy or ``log_softmax``
        on it reads the mixture's probabilities. Each member keeps its own dropout.

        Args:
            features: (B, h, w, D) grids (or (B, D) pooled features when no member attends).
            captions: (S, T) token ids ``<start> w1 .. wn <end> <pad>..``.
            lengths: (S,) real tokens per row, ``<start>`` and ``<end>`` included.
            images: (S,) the photo of each caption, an index into ``features`` (None: S = B).

        Returns:
            ``(log_probs, targets)`` over the N = sum(lengths - 1) predicted positions, in the members' packed order.
        """
        logps, targets = [], None
        for m in self.members:
            logits, t = m(self.member_features(m, features), captions, lengths, images)  # (N, V), (N,)
            if targets is not None and not torch.equal(t, targets):  # the mixture is position by position
                raise RuntimeError("the ensemble's members returned their positions in different orders")
            targets = t
            logps.append(torch.log_softmax(logits.float(), dim=-1))
        return self.mix(logps), targets
