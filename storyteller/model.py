"""The Show-and-Tell decoder: image feature -> LSTM state, then an LSTM language model.

    feature (B, F) --Dropout--Linear--tanh--> h0, c0 (L, B, H)       # the image sets the LSTM state
    tokens  (B, T) --Embedding(E)--Dropout--> LSTM(H, L layers) --Dropout--Linear--> logits (.., V)

Why the image goes into the state rather than as the first input word (Vinyals et al. feed it as
x_{-1}): it costs no extra time step, the embedding space holds words only, and every decoding
step (greedy, beam) starts from one ready state; the original project used h0 = Linear(feature)
too. We also initialise c0 from the image (the original left c0 = 0), which gives the cell memory
the image from step 0.

Hub layout (through ``huggingface_hub.PyTorchModelHubMixin``): ``config.json`` (every init
argument, including the backbone spec with its preprocessing, and ``decoder``, the model type),
``model.safetensors`` and our own ``vocab.json``. Loading is strict: a missing or unexpected tensor,
or a vocabulary whose size does not match the config, is an error. ``load_decoder(folder_or_repo)``
reads ``config.json`` and builds the right class (this one, or ``ShowAttendTell`` from
``storyteller.attention``); configs written before ``decoder`` existed are Show-and-Tell.

The decoding protocol every decoder follows (``storyteller.decoding`` relies on nothing else):
``init_state(features) -> state``, ``step(tokens, state) -> (log_probs, state)``, and
``select_state(state, rows)`` / ``scatter_state(state, rows, sub)`` to take and write back batch rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from torch.nn.utils.rnn import pack_padded_sequence

from .precision import packed
from .vocab import Vocabulary

VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
State = tuple  # (h, c), each (L, B, H); with packed weights also r (L, B, 4H), see ShowAndTell.step
DECODER = "show_and_tell"


def packed_gates(t: torch.Tensor, hidden_dim: int, dim: int = 0) -> torch.Tensor:
    """An LSTM's gate blocks i, f, g, o along ``dim`` (weight or bias rows, or a table's columns) as the
    packed steps use them: i, f, o, 2g. The packed step applies one sigmoid to all four blocks and gets
    tanh(g) = 2 sigmoid(2g) - 1 from the last: on a CPU one sigmoid over 4H costs less than a sigmoid over
    3H and a tanh over H. (Doubling is exact in every precision: int8 keeps the same integers, with
    twice the per-output-channel weight scale.)"""
    H = hidden_dim
    order = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(t.device)
    scale = torch.ones(4 * H, dtype=t.dtype, device=t.device)
    scale[3 * H:] = 2.0
    shape = [1] * t.dim()
    shape[dim] = 4 * H
    return t.index_select(dim, order) * scale.view(shape)


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM cell's update from packed gates (N, 4H) in the order i, f, o, 2g (:func:`packed_gates`) and
    the cell state c (N, H) -> (h, c), each (N, H)."""
    i, f, o, g2 = torch.sigmoid(gates).chunk(4, 1)  # g2 = sigmoid(2g), so tanh(g) = 2 g2 - 1
    c = (f * c).addcmul_(i, g2, value=2.0).sub_(i)  # f c + i (2 g2 - 1) = f c + i tanh(g), in one new tensor
    return o * torch.tanh(c), c


class HubDecoder:
    """What every decoder shares: the strict Hub save/load with ``vocab.json``, and the default
    state handling for states that are tuples of (layers, batch, hidden) tensors.

    Subclasses set ``decoder_type`` (the ``decoder`` value in ``config.json``).
    """

    decoder_type: str = DECODER
    has_attention: bool = False
    vocab: Vocabulary | None

    def _init_common(self, decoder: str, vocab_size: int, feature_dim: int, backbone: dict[str, Any] | None,
                     extra: dict[str, Any] | None) -> None:
        """Check the decoder type and vocabulary size; set what every decoder records."""
        if decoder != self.decoder_type:
            raise ValueError(f"config.json says decoder {decoder!r} but {type(self).__name__} is {self.decoder_type!r}; "
                             f"load it with storyteller.model.load_decoder")
        if vocab_size < 5:
            raise ValueError(f"vocab_size must cover the 4 special tokens and a word, got {vocab_size}")
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.backbone = backbone
        self.extra = extra or {}
        self.vocab = None  # attached by from_pretrained / the trainer

    def select_state(self, state: tuple, rows: torch.Tensor) -> tuple:
        """The state of batch rows ``rows`` (N,) (rows may repeat: beam search copies hypotheses)."""
        return tuple(s.index_select(1, rows) for s in state)

    def scatter_state(self, state: tuple, rows: torch.Tensor, sub: tuple) -> tuple:
        """``state`` with batch rows ``rows`` replaced by ``sub`` (a new tuple; ``state`` is unchanged).
        A part only one of them has (a cache ``step`` can rebuild, e.g. ``r``) is dropped."""
        out = []
        for s, new in zip(state, sub):
            s = s.clone()
            s[:, rows] = new
            out.append(s)
        return tuple(out)

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
        # Our own loader rather than the mixin's: strict by default (the mixin's strict=False would leave
        # missing tensors random), safetensors only (no pickle fallback), and vocab.json checked against config.
        import safetensors.torch

        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        config_path = _resolve_file(model_id, CONFIG_FILE, **hub)  # raises a clear error if absent
        if "vocab_size" not in model_kwargs:
            raise ValueError(f"{model_id}: {config_path.name} has no 'vocab_size'; not a Neural Storyteller model")
        vocab = Vocabulary.load(_resolve_file(model_id, VOCAB_FILE, **hub))
        if len(vocab) != model_kwargs["vocab_size"]:
            raise ValueError(f"{model_id}: {VOCAB_FILE} has {len(vocab)} tokens but {CONFIG_FILE} says "
                             f"vocab_size={model_kwargs['vocab_size']}; the vocabulary does not belong to these weights")
        model = cls(**model_kwargs)
        weights = _resolve_file(model_id, WEIGHTS_FILE, **hub)
        try:
            safetensors.torch.load_model(model, str(weights), strict=strict, device=map_location)
        except (RuntimeError, ValueError) as e:  # shape mismatch, missing/unexpected tensors, corrupt file
            raise ValueError(f"{model_id}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: {e}") from None
        model.vocab = vocab
        return model.to(map_location).eval()  # load_model fills the existing (CPU) parameters


class ShowAndTell(
    HubDecoder,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="neural-storyteller",
    tags=["image-captioning", "show-and-tell", "lstm"],
    pipeline_tag="image-to-text",
    license="mit",
):
    """LSTM caption decoder conditioned on a pooled CNN feature.

    Args:
        vocab_size: number of token ids (special tokens included); must equal ``len(vocab)``.
        feature_dim: size of the image feature (2048 for ResNet50, 1280 for EfficientNet-Lite0).
        embed_dim: word embedding size.
        hidden_dim: LSTM hidden size.
        num_layers: stacked LSTM layers.
        dropout: dropout on the image feature, the embeddings, between LSTM layers and before the
            output layer (0 disables it).
        backbone: the CNN that makes the features, as a JSON-able spec (name, weights,
            preprocessing); stored in ``config.json`` so the app rebuilds the same transform.
        extra: free-form JSON metadata (e.g. training dataset, metrics).
        decoder: the model type recorded in ``config.json``; must be ``"show_and_tell"``.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int = 2048,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.0,
        backbone: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        decoder: str = DECODER,
    ):
        super().__init__()
        self._init_common(decoder, vocab_size, feature_dim, backbone, extra)
        self.embed_dim, self.hidden_dim, self.num_layers = embed_dim, hidden_dim, num_layers

        self.feature_dropout = nn.Dropout(dropout)
        self.init_h = nn.Linear(feature_dim, num_layers * hidden_dim)
        self.init_c = nn.Linear(feature_dim, num_layers * hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        self.embed_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.out_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    # -- the two primitives every decoder uses -----------------------------------------------------
    def init_state(self, features: torch.Tensor, images: torch.Tensor | None = None) -> State:
        """(B, F) image features -> LSTM state (h, c), each (num_layers, B, hidden_dim); with ``images``
        (S,), each (num_layers, S, hidden_dim), row s for photo ``images[s]``."""
        if images is not None:
            return tuple(s[:, images] for s in self.init_state(features))
        B, L, H = features.shape[0], self.num_layers, self.hidden_dim
        fast = packed(self)
        if fast is not None and not torch.is_grad_enabled():  # decoding (forward() needs the weights' gradients)
            # init_h and init_c stacked in one product (storyteller.precision)
            hc = torch.tanh(fast["init"](features.float())).view(B, 2, L, H).permute(1, 2, 0, 3).contiguous()  # (2, L, B, H)
            return hc[0], hc[1]
        x = self.feature_dropout(features.to(self.init_h.weight.dtype))
        h = torch.tanh(self.init_h(x)).view(B, L, H).transpose(0, 1)
        c = torch.tanh(self.init_c(x)).view(B, L, H).transpose(0, 1)
        return h.contiguous(), c.contiguous()

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoder step. tokens (B,) -> log-probabilities (B, V) and the new state.

        Runs ``torch.lstm_cell`` layer by layer on the ``nn.LSTM``'s own weights: for a single time
        step that is the same computation as ``self.lstm`` (a test checks it against the packed
        forward) at a quarter of the call overhead, which dominates decoding one photo on a CPU.
        With packed weights (``storyteller.precision``) it runs :meth:`_packed_step` instead.
        """
        fast = packed(self)  # low-precision copies of the step's weights (storyteller.precision), or None
        if fast is not None:
            return self._packed_step(fast, tokens, state)
        h, c = state[0], state[1]  # (L, B, H) each; a packed step's r, if any, is not needed here
        x = self.embed_dropout(self.embed(tokens))  # (B, E)
        hs, cs = [], []
        for layer in range(self.num_layers):
            w = [getattr(self.lstm, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h_l, c_l = torch.lstm_cell(x, (h[layer], c[layer]), *w)
            hs.append(h_l)
            cs.append(c_l)
            x = h_l
            if layer < self.num_layers - 1:  # nn.LSTM's dropout between layers
                x = nn.functional.dropout(x, self.lstm.dropout, self.training)
        logits = self.head(self.out_dropout(x))  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1), (torch.stack(hs), torch.stack(cs))

    def _packed_step(self, fast, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The same LSTM cell on packed weights, one product per layer (a step's products cost more in
        call overhead than in arithmetic on a CPU): layer l's new h_l is multiplied once, by
        [W_ih(l+1); W_hh(l)] (the next layer's input gates now, and this layer's recurrent gates for the
        next step) or, for the last layer, by [head; W_hh(l)] (the logits now, and the recurrent gates).
        The recurrent half travels in the state as r (L, B, 4H); a state without it (from
        ``init_state``) has it made first. The packed gate rows are i, f, o, 2g (:func:`packed_gates`),
        so the four gates are one sigmoid.
        """
        h, c = state[0], state[1]  # (L, B, H) each
        L, G = self.num_layers, 4 * self.hidden_dim
        names = [f"out{layer}" for layer in range(L - 1)] + ["head"]
        if len(state) > 2:
            r = state[2]  # (L, B, 4H): W_hh(l) h_l + b_hh(l), made by the previous step
        else:  # the first step: each layer's recurrent gates on the initial state, by W_hh(l) alone
            r = torch.stack([fast[f"rec{layer}"](h[layer]) for layer in range(L)])
        x = fast["word0"](tokens)  # (B, 4H) layer 0's input gates: a row of the word table
        hs, cs, rs = [], [], []
        for layer, name in enumerate(names):
            h_l, c_l = lstm_update(x + r[layer], c[layer])  # gates (B, 4H) packed i, f, o, 2g
            out = fast[name](h_l)  # (B, 4H + 4H) or (B, V + 4H)
            x, r_l = out.split([out.shape[1] - G, G], 1)  # the next layer's input gates (or the logits); W_hh h + b_hh
            hs.append(h_l)
            cs.append(c_l)
            rs.append(r_l)
        return torch.log_softmax(x.float(), dim=-1), (torch.stack(hs), torch.stack(cs), torch.stack(rs))

    @property
    def step_unit_range(self) -> tuple[str, ...]:
        """The packed products whose input is a hidden state, within [-1, 1] (all of them here)."""
        return tuple(f"out{layer}" for layer in range(self.num_layers - 1)) + ("head",) + \
            tuple(f"rec{layer}" for layer in range(self.num_layers))

    @property
    def step_seven_bit(self) -> tuple[str, ...]:
        """The packed products whose int8 activations are 7 bits: the output layer's, and ``rec{L-1}``,
        which holds some of its rows (the same rows must give the same numbers in both)."""
        return ("head", f"rec{self.num_layers - 1}")

    def step_linears(self) -> dict[str, Any]:
        """The matrices the packed step multiplies by, for ``storyteller.precision.prepare``: name ->
        (weight, bias), or name -> a lookup table by token id.

        - ``init``: [init_h; init_c] with their biases, (2 L H, F): ``init_state``'s two products in one
        - ``word0``: layer 0's input gates of every word, embedding x W_ih0 + b_ih0, (V, 4H): a row lookup
        - ``out{l}`` (l < L-1): [W_ih(l+1); W_hh(l)] with [b_ih(l+1); b_hh(l)], for h_l
        - ``head``: [output layer; W_hh(L-1)] with [its bias; b_hh(L-1)], for the last layer's h
        - ``rec{l}``: W_hh(l) with b_hh(l) alone, for the first step's initial state (the stacked
          products would also make the next layer's gates and the logits of a state no step continues)

        Every gate block's rows are i, f, o, 2g (:func:`packed_gates`).
        """
        lstm, H = self.lstm, self.hidden_dim
        with torch.no_grad():
            out: dict[str, Any] = {
                "init": (torch.cat([self.init_h.weight, self.init_c.weight]), torch.cat([self.init_h.bias, self.init_c.bias])),
                "word0": packed_gates(nn.functional.linear(self.embed.weight.float(), lstm.weight_ih_l0.float(),
                                                           lstm.bias_ih_l0.float()), H, dim=1)}
            for layer in range(self.num_layers):
                above = (packed_gates(getattr(lstm, f"weight_ih_l{layer + 1}"), H),
                         packed_gates(getattr(lstm, f"bias_ih_l{layer + 1}"), H)) \
                    if layer < self.num_layers - 1 else (self.head.weight, self.head.bias)
                w = torch.cat([above[0], packed_gates(getattr(lstm, f"weight_hh_l{layer}"), H)])
                b = torch.cat([above[1], packed_gates(getattr(lstm, f"bias_hh_l{layer}"), H)])
                out[f"out{layer}" if layer < self.num_layers - 1 else "head"] = (w, b)
                out[f"rec{layer}"] = (w[-4 * H:], b[-4 * H:])
        return out

    # -- teacher-forced training -----------------------------------------------------------------
    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits over packed sequences, so padding costs no compute.

        Args:
            features: (B, F) image features.
            captions: (S, T) token ids ``<start> w1 .. wn <end> <pad>..``.
            lengths: (S,) number of real tokens per row, ``<start>`` and ``<end>`` included.
            images: (S,) the photo of each caption, an index into ``features`` (None: S = B, row i is
                photo i): SCST scores several captions per photo from one initial state per photo.

        Returns:
            ``(logits, targets)``: logits (N, V) for the N = sum(lengths - 1) predicted positions, and
            their target ids (N,), both in the packed (time-major) order.
        """
        lengths = lengths.to("cpu", torch.int64)
        inputs, targets = captions[:, :-1], captions[:, 1:]  # predict token t+1 from tokens <= t
        steps = lengths - 1
        packed_in = pack_padded_sequence(self.embed_dropout(self.embed(inputs)), steps, batch_first=True, enforce_sorted=False)
        packed_tgt = pack_padded_sequence(targets, steps, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed_in, self.init_state(features, images))
        logits = self.head(self.out_dropout(out.data))  # (N, V): only real positions
        return logits, packed_tgt.data


def _resolve_file(model_id: str, filename: str, **hub_kwargs) -> Path:
    """A file of a local model folder, or downloaded from the Hub repo ``model_id``."""
    local = Path(model_id)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{model_id} is missing {filename}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs))


def read_config(model_dir: str | Path) -> dict:
    """The ``config.json`` of a local model folder, as a dict."""
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))


def decoder_classes() -> dict[str, type]:
    """``config.json``'s ``decoder`` value -> the class that loads it."""
    from .attention import ShowAttendTell

    return {ShowAndTell.decoder_type: ShowAndTell, ShowAttendTell.decoder_type: ShowAttendTell}


def load_decoder(model_id: str | Path, **kwargs: Any):
    """Load any Neural Storyteller decoder (Show-and-Tell or Show-Attend-Tell) from a folder or Hub repo.

    Args:
        model_id: a local model folder or a Hub repo id.
        **kwargs: passed to ``from_pretrained`` (revision, map_location, local_files_only...).
    """
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "local_files_only", "token") if k in kwargs}
    config_path = _resolve_file(str(model_id), CONFIG_FILE, **hub)
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{model_id}: unreadable {CONFIG_FILE} ({e})") from None
    kind = config.get("decoder", DECODER) if isinstance(config, dict) else None
    classes = decoder_classes()
    if kind not in classes:
        raise ValueError(f"{model_id}: {CONFIG_FILE} names decoder {kind!r}; this version knows {sorted(classes)}")
    return classes[kind].from_pretrained(str(model_id), **kwargs)
