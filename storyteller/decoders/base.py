"""What every decoder shares: the decoding state, the step's products in a precision, and the Hub layout.

The decoding protocol (``storyteller.decoding`` relies on nothing else):

    state = model.init_state(features)                 # one row per photo
    products = model.products()                        # the step's matrices in model.precision, made once
    logp, state = model.step(tokens, state, products)  # (N,) tokens -> (N, V) log-probabilities
    state = model.select_state(state, rows)            # rows (N',) of the batch (beam search copies rows)
    state = model.scatter_state(state, rows, sub)      # rows written back (finished rows leave the call)

A decoder writes its step once, in terms of the matrix products it declares in ``step_products()``
(``storyteller.precision.Product``: what each multiplies and how its output splits); the precision
(``model.precision``: fp32, bf16 or int8) decides how they are computed. ``step`` is the decoding step: no
dropout, no gradient. Training runs the teacher-forced ``forward`` on the model's own layers.

Hub layout (``huggingface_hub.PyTorchModelHubMixin``): ``config.json`` (every init argument, the backbone spec
with its preprocessing, and ``decoder``, the registry key), ``model.safetensors`` and ``vocab.json``. Loading is
strict: a missing or unexpected tensor, or a vocabulary whose size does not match the config, is an error
(``storyteller.loading``, where the files and their checks are defined).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading import CONFIG_FILE, VOCAB_FILE, load_vocabulary, load_weights_strictly, resolve_file
from ..precision import Product, Products, make_products, weights_signature
from ..vocab import Vocabulary


@dataclass(frozen=True)
class DecoderState:
    """A batch of N decoding rows, the same structure in every precision.

    Every tensor in ``h``, ``c`` and ``carry`` has the rows along dim 0. ``photos`` are tensors of B photos
    (dim 0) that rows read without owning a copy: row i reads photo ``image[i]`` (None: row i is photo i).
    Beam search copies rows, never photos.

    Attributes:
        h: per LSTM layer, the hidden state (N, H).
        c: per LSTM layer, the cell state (N, H).
        carry: per layer, the products of h that the next step needs, made by the step that made h (so each new
            hidden state is multiplied once; see each decoder's ``step``).
        photos: per-photo tensors (B, ...), e.g. an attention decoder's regions and their projection.
        image: (N,) the photo of each row, or None.
        row_photos: ``photos`` gathered by ``image`` (N, ...), made by the step that first needed them and kept
            while every row keeps its photo (beam search reorders rows within their photo), so a search gathers
            them once, not at every step; () when not made yet or no longer valid.
    """

    h: tuple[torch.Tensor, ...]
    c: tuple[torch.Tensor, ...]
    carry: tuple[torch.Tensor, ...]
    photos: tuple[torch.Tensor, ...] = ()
    image: torch.Tensor | None = None
    row_photos: tuple[torch.Tensor, ...] = ()

    def per_row(self) -> tuple[torch.Tensor, ...]:
        """Each row's photo tensors (N, ...): ``photos`` themselves when row i is photo i, else ``row_photos``,
        gathered now if not kept. A step passes them on as its new state's ``row_photos``."""
        if self.image is None:
            return self.photos
        return self.row_photos or tuple(p.index_select(0, self.image) for p in self.photos)

    def select(self, rows: torch.Tensor) -> DecoderState:
        """The state of rows ``rows`` (N',) (rows may repeat: beam search copies hypotheses)."""
        pick = lambda ts: tuple(t.index_select(0, rows) for t in ts)  # noqa: E731
        image = rows if self.image is None else self.image.index_select(0, rows)
        # rows that read the same photos as before (a beam's reordering within each photo): the gathered copies hold
        # the same values row for row, so they stay; otherwise the next step gathers again
        same = bool(self.row_photos) and self.image is not None and torch.equal(image, self.image)
        return DecoderState(pick(self.h), pick(self.c), pick(self.carry), self.photos, image,
                            self.row_photos if same else ())

    def scatter(self, rows: torch.Tensor, sub: DecoderState) -> DecoderState:
        """This state with rows ``rows`` replaced by ``sub``'s (a new state; this one is unchanged). Rows never
        change photo, so ``photos`` and ``image`` stay."""
        def put(ts, new):
            out = []
            for t, n in zip(ts, new):
                t = t.clone()
                t[rows] = n
                out.append(t)
            return tuple(out)

        return DecoderState(put(self.h, sub.h), put(self.c, sub.c), put(self.carry, sub.carry), self.photos, self.image,
                            self.row_photos)

    def own_photos(self) -> DecoderState:
        """The same rows, each with its own copy of its photo's tensors (no gather at every step: training's
        samples, where every row stays)."""
        if self.image is None:
            return self
        return DecoderState(self.h, self.c, self.carry, tuple(p.index_select(0, self.image) for p in self.photos))


def packed_gates(t: torch.Tensor, hidden_dim: int, dim: int = 0) -> torch.Tensor:
    """An LSTM's gate blocks i, f, g, o along ``dim`` (weight or bias rows, or a table's columns) as the step
    uses them: i, f, o, 2g. One sigmoid then covers all four blocks, with tanh(g) = 2 sigmoid(2g) - 1 from the
    last: on a CPU one sigmoid over 4H costs less than a sigmoid over 3H and a tanh over H. (Doubling is exact
    in every precision: int8 keeps the same integers, with twice the per-output-channel weight scale.)"""
    H = hidden_dim
    order = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(t.device)
    scale = torch.ones(4 * H, dtype=t.dtype, device=t.device)
    scale[3 * H:] = 2.0
    shape = [1] * t.dim()
    shape[dim] = 4 * H
    return t.index_select(dim, order) * scale.view(shape)


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM cell's update from gates (N, 4H) in the order i, f, o, 2g (:func:`packed_gates`) and the cell
    state c (N, H) -> (h, c), each (N, H)."""
    i, f, o, g2 = torch.sigmoid(gates).chunk(4, 1)  # g2 = sigmoid(2g), so tanh(g) = 2 g2 - 1
    c = (f * c).addcmul_(i, g2, value=2.0).sub_(i)  # f c + i (2 g2 - 1) = f c + i tanh(g), in one new tensor
    return o * torch.tanh(c), c


class HubDecoder(torch.nn.Module):
    """The base of every decoder: strict Hub save/load with ``vocab.json``, the decoding state, and the step's
    products in ``precision``.

    A subclass (one file in this package, one line in ``registry.DECODERS``; ``show_and_tell.py`` is the
    shortest example):

    - sets ``decoder_type`` (its registry key, recorded as ``decoder`` in ``config.json``) and, for a decoder
      that reads the feature grid, ``has_attention = True``;
    - inherits ``huggingface_hub.PyTorchModelHubMixin`` after this class (``save_pretrained`` /
      ``from_pretrained``), takes ``vocab_size, feature_dim, ..., backbone, extra, decoder`` and calls
      ``_init_common`` first in ``__init__``; ``embed_dim``, ``hidden_dim`` and ``num_layers`` attributes,
      where they mean something, show in ``Captioner.info``;
    - declares its products in ``step_products()``: ``Input.HIDDEN`` only for inputs that are always within
      [-1, 1] (not checked; int8 relies on it), and the initial state's carried products as ``Product.tail``
      of the products a step makes, so int8 gives those rows the same numbers;
    - implements ``initial_state(features, products)`` (what the searches call) and
      ``step(tokens, state, products=None[, return_attention=False])`` (keyword arguments, as the searches
      pass them), reading the products only through ``products[name]``;
    - implements ``forward(features, captions, lengths, images=None) -> (logits (N, V), targets (N,))`` over the
      N real positions in packed time-major order, on its own layers (training: SCST re-scores its samples
      with it; ``fit`` trains the decoders it knows, see ``train/fit.py``).
    """

    decoder_type: str = ""
    has_attention: bool = False
    vocab: Vocabulary | None

    def _init_common(self, decoder: str, vocab_size: int, feature_dim: int, backbone: dict[str, Any] | None,
                     extra: dict[str, Any] | None) -> None:
        """Check the decoder type and vocabulary size; set what every decoder records."""
        if decoder != self.decoder_type:
            raise ValueError(f"config.json says decoder {decoder!r} but {type(self).__name__} is {self.decoder_type!r}; "
                             f"load it with storyteller.decoders.load_decoder")
        if vocab_size < 5:
            raise ValueError(f"vocab_size must cover the 4 special tokens and a word, got {vocab_size}")
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"extra must be a JSON object (a dict), got {type(extra).__name__}")
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.backbone = backbone
        self.extra = extra or {}
        self.vocab = None  # attached by from_pretrained / the trainer
        self.precision = "fp32"  # how step() computes its products (storyteller.precision)
        self._products: Products | None = None
        if isinstance(getattr(self, "_hub_mixin_config", None), dict):  # config.json names the class to load
            self._hub_mixin_config.setdefault("decoder", self.decoder_type)

    # -- the decoding protocol ---------------------------------------------------------------------
    def step_products(self) -> dict[str, Product]:
        """The step's matrix products, by name: made from the current weights (``storyteller.precision``)."""
        raise NotImplementedError

    def initial_state(self, features: torch.Tensor, products: Products) -> DecoderState:
        """One row per photo: the state before the first word."""
        raise NotImplementedError

    def init_state(self, features: torch.Tensor, images: torch.Tensor | None = None) -> DecoderState:
        """The decoding state of a batch of photos' features: one row per photo, or with ``images`` (S,) one row
        per entry, row s for photo ``images[s]``, each with its own copy of its photo's tensors (SCST's samples:
        the photo is projected once, and no step gathers it again).

        Args:
            features: the backbone's features of B photos (the decoder's shape: pooled or grids).
            images: (S,) photo indices, or None.
        """
        state = self.initial_state(features, self.products())
        return state if images is None else state.select(images).own_photos()

    def select_state(self, state: DecoderState, rows: torch.Tensor) -> DecoderState:
        return state.select(rows)

    def scatter_state(self, state: DecoderState, rows: torch.Tensor, sub: DecoderState) -> DecoderState:
        return state.scatter(rows, sub)

    def products(self) -> Products:
        """The step's products in ``self.precision`` for the weights as they are now: made on first use, and
        again whenever a weight changed (``precision.weights_signature``). A GPU runs fp32."""
        params = list(self.parameters())
        precision = self.precision if not params or params[0].device.type == "cpu" else "fp32"
        signature = weights_signature(params)
        made = self._products
        if made is None or made.precision != precision or made.signature != signature:
            device = params[0].device.type if params else "cpu"
            with torch.no_grad(), torch.autocast(device, enabled=False):
                made = make_products(self.step_products(), precision, signature)
            self._products = made
        return made

    def init_arguments(self) -> dict[str, Any]:
        """A copy of the arguments this model was built with: what its ``config.json`` records."""
        import copy

        return copy.deepcopy(self._hub_mixin_config)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_products"] = None  # packed int8 / float16 kernels do not pickle; products() makes them again
        return state

    # -- Hub layout ----------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        if self.vocab is None:
            raise ValueError("attach a vocabulary (model.vocab = Vocabulary(...)) before save_pretrained")
        if len(self.vocab) != self.vocab_size:
            raise ValueError(f"vocabulary has {len(self.vocab)} tokens but the model has vocab_size={self.vocab_size}")
        super()._save_pretrained(save_directory)
        self.vocab.save(Path(save_directory) / VOCAB_FILE)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir=None, force_download: bool = False,
                         local_files_only: bool = False, token=None, map_location: str = "cpu", strict: bool = True,
                         **model_kwargs):
        # Our own loader rather than the mixin's (storyteller.loading): strict by default, safetensors only,
        # vocab.json checked against config, and every weight finite.
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        config_path = resolve_file(model_id, CONFIG_FILE, **hub)  # raises a clear error if absent
        if "vocab_size" not in model_kwargs:
            raise ValueError(f"{model_id}: {config_path.name} has no 'vocab_size'; not a Neural Storyteller model")
        vocab = load_vocabulary(model_id, model_kwargs["vocab_size"], **hub)
        model = cls(**model_kwargs)
        load_weights_strictly(model, model_id, map_location, strict, **hub)
        model.vocab = vocab
        return model.to(map_location).eval()  # load_model fills the existing (CPU) parameters
