"""The Show-and-Tell decoder: image feature -> LSTM state, then an LSTM language model.

    feature (B, F) --Dropout--Linear--tanh--> h0, c0 (L, B, H)       # the image sets the LSTM state
    tokens  (B, T) --Embedding(E)--Dropout--> LSTM(H, L layers) --Dropout--Linear--> logits (.., V)

Why the image goes into the state rather than as the first input word (Vinyals et al. feed it as
x_{-1}): it costs no extra time step, the embedding space holds words only, and every decoding
step (greedy, beam) starts from one ready state; the original project used h0 = Linear(feature)
too. We also initialise c0 from the image (the original left c0 = 0), which gives the cell memory
the image from step 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from torch.nn.utils.rnn import pack_padded_sequence

from ..precision import Input, Product, Products
from ..vocab import Vocabulary
from .base import DecoderState, HubDecoder, lstm_update, packed_gates


class ShowAndTell(
    HubDecoder,
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

    decoder_type = "show_and_tell"

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
        decoder: str = "show_and_tell",
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

    # -- decoding: the step, written once over the products it declares -----------------------------
    def step_products(self) -> dict[str, Product]:
        """The step's matrix products (gate rows i, f, o, 2g: ``base.packed_gates``):

        - ``init``: [init_h; init_c], (2 L H, F): ``initial_state``'s two projections of the photo in one
        - ``word``: layer 0's input gates of every word, embedding x W_ih(0) + b_ih(0), (V, 4H): a table
        - ``layer{l}`` (l < L-1): [W_ih(l+1); W_hh(l)] for h_l: the next layer's input gates now, and this
          layer's recurrent gates for the next step; the last layer's: [output layer; W_hh(L-1)]: the logits
          now, and the recurrent gates
        - ``rec{l}``: W_hh(l) alone (the last rows of ``layer{l}``), for the initial state's h
        """
        lstm, H, L = self.lstm, self.hidden_dim, self.num_layers
        word = nn.functional.linear(self.embed.weight.float(), lstm.weight_ih_l0.float(), lstm.bias_ih_l0.float())
        out = {"init": Product(torch.cat([self.init_h.weight, self.init_c.weight]),
                               torch.cat([self.init_h.bias, self.init_c.bias]), Input.PHOTO),
               "word": Product(packed_gates(word, H, dim=1), None, Input.TOKEN)}
        for layer in range(L):
            last = layer == L - 1
            above_w, above_b = (self.head.weight, self.head.bias) if last else \
                (packed_gates(getattr(lstm, f"weight_ih_l{layer + 1}"), H), packed_gates(getattr(lstm, f"bias_ih_l{layer + 1}"), H))
            product = Product(torch.cat([above_w, packed_gates(getattr(lstm, f"weight_hh_l{layer}"), H)]),
                              torch.cat([above_b, packed_gates(getattr(lstm, f"bias_hh_l{layer}"), H)]),
                              Input.HIDDEN, parts=(above_w.shape[0], 4 * H), logits=last)
            out[f"layer{layer}"], out[f"rec{layer}"] = product, product.tail(4 * H)
        return out

    def initial_state(self, features: torch.Tensor, products: Products) -> DecoderState:
        """(B, F) features -> h, c of every layer (B, H) and each layer's recurrent gates W_hh h + b_hh."""
        B, L, H = features.shape[0], self.num_layers, self.hidden_dim
        hc = torch.tanh(products["init"](features.float())).view(B, 2, L, H)  # one product for h and c
        h = tuple(hc[:, 0, layer].contiguous() for layer in range(L))
        c = tuple(hc[:, 1, layer].contiguous() for layer in range(L))
        return DecoderState(h, c, tuple(products[f"rec{layer}"](h[layer]) for layer in range(L)))

    def step(self, tokens: torch.Tensor, state: DecoderState, products: Products | None = None
             ) -> tuple[torch.Tensor, DecoderState]:
        """One decoding step: tokens (N,) -> log-probabilities (N, V) and the new state.

        Each layer's gates are its input gates (layer 0: a row of the word table; above: made by the layer
        below) plus its recurrent gates, which the previous step made together with its other products of
        the same h (``state.carry``): each new hidden state is multiplied once.
        """
        P = products if products is not None else self.products()
        x = P["word"](tokens)  # (N, 4H) layer 0's input gates
        hs, cs, carry = [], [], []
        for layer in range(self.num_layers):
            h, c = lstm_update(x + state.carry[layer], state.c[layer])  # (N, H) each
            x, rec = P[f"layer{layer}"](h)  # the next layer's input gates (last layer: the logits (N, V)); (N, 4H)
            hs.append(h)
            cs.append(c)
            carry.append(rec)
        return torch.log_softmax(x.float(), dim=-1), DecoderState(tuple(hs), tuple(cs), tuple(carry))

    # -- teacher-forced training -----------------------------------------------------------------
    def initial_lstm_state(self, features: torch.Tensor, images: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``nn.LSTM``'s initial (h0, c0), each (L, B, H), from (B, F) features, with dropout and gradient
        (training); with ``images`` (S,), (L, S, H), row s for photo ``images[s]``."""
        B, L, H = features.shape[0], self.num_layers, self.hidden_dim
        x = self.feature_dropout(features.to(self.init_h.weight.dtype))
        h = torch.tanh(self.init_h(x)).view(B, L, H).transpose(0, 1)
        c = torch.tanh(self.init_c(x)).view(B, L, H).transpose(0, 1)
        if images is not None:
            h, c = h[:, images], c[:, images]
        return h.contiguous(), c.contiguous()

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
        out, _ = self.lstm(packed_in, self.initial_lstm_state(features, images))
        logits = self.head(self.out_dropout(out.data))  # (N, V): only real positions
        return logits, packed_tgt.data
