"""The Show-Attend-Tell decoder: an LSTM that looks over the CNN's feature grid at every word.

    grid (B, h, w, D) -> regions V (B, R=h*w, D) ---------------------------------+
      mean over R --Dropout--Linear--tanh--> h0, c0 (B, H)                        |
      V --Linear--> enc (B, R, A)  (computed once per photo, reused every step)  |
    each step t, from the previous hidden state h (B, H):                          |
      e = w . tanh(enc + W h)          (B, R)   additive attention                 |
      alpha = softmax_R(e)             (B, R)   where the model looks              |
      z = sigmoid(W_beta h) * sum_R alpha V      (B, D)  gated context  <----------+
      h, c = LSTMCell([embed(word); z], (h, c))
      log p(next word) = log_softmax(Linear(Dropout(h)))

This is Xu et al. 2015 ("Show, Attend and Tell") soft attention with its gating scalar beta and its
doubly stochastic regularisation, :func:`attention_penalty`: mean over regions of (1 - sum_t alpha_t)^2,
which asks the model to look at every region over the whole caption rather than stare at one.

Decoding state: h, c (N, H); ``carry``: the products of h the next step needs (query W h, gate W_beta h,
recurrent gates W_hh h + b_hh), made by the step that made h, together with its logits; ``photos``: the
regions V (B, R, D) and their projection enc (B, R, A), shared by the rows of a photo (beam search copies
rows, never photos, so a grid is projected once per photo); ``row_photos``: those gathered per row (N, R, .),
made by the first step that reads them and kept while the rows keep their photos (a beam reorders rows within
each photo), so a search copies them once, not at every step.
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


class ShowAttendTell(
    HubDecoder,
    PyTorchModelHubMixin,
    library_name="neural-storyteller",
    tags=["image-captioning", "show-attend-tell", "attention", "lstm"],
    pipeline_tag="image-to-text",
    license="mit",
):
    """Soft-attention LSTM caption decoder over a CNN feature grid.

    Args:
        vocab_size: number of token ids (special tokens included); must equal ``len(vocab)``.
        feature_dim: channels D of the grid (1280 for EfficientNet-Lite0, 2048 for ResNet50).
        embed_dim: word embedding size.
        hidden_dim: LSTM hidden size.
        attention_dim: size A of the additive attention's hidden layer.
        dropout: dropout on the mean region, the embeddings and before the output layer.
        grid: (h, w) of the grids the model was trained on (informational: any grid size works).
        backbone: the CNN spec (name, weights, preprocessing), as for ``ShowAndTell``.
        extra: free-form JSON metadata (training, metrics, decoding settings).
        decoder: the model type in ``config.json``; must be ``"show_attend_tell"``.
    """

    decoder_type = "show_attend_tell"
    has_attention = True

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int = 2048,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.0,
        grid: list[int] | None = None,
        backbone: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        decoder: str = "show_attend_tell",
    ):
        super().__init__()
        self._init_common(decoder, vocab_size, feature_dim, backbone, extra)
        self.embed_dim, self.hidden_dim, self.attention_dim = embed_dim, hidden_dim, attention_dim
        self.num_layers = 1
        self.grid = list(grid) if grid is not None else None

        self.feature_dropout = nn.Dropout(dropout)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.att_enc = nn.Linear(feature_dim, attention_dim)  # regions -> attention space, once per photo
        self.att_hid = nn.Linear(hidden_dim, attention_dim, bias=False)  # state -> attention space, every step
        self.att_out = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # Xu et al.'s beta: how much context to let in
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.pad_id)
        self.embed_dropout = nn.Dropout(dropout)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.out_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    # -- what both the decoding step and training use ------------------------------------------------
    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """Grids (B, h, w, D) or regions (B, R, D) -> regions (B, R, D) in the weights' dtype."""
        if features.dim() == 4:
            features = features.flatten(1, 2)
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"an attention decoder needs feature grids (B, h, w, {self.feature_dim}) or regions "
                             f"(B, R, {self.feature_dim}), got shape {tuple(features.shape)}; pooled (B, D) features "
                             "do not have the regions it attends over (extract with --grid)")
        return features.to(self.head.weight.dtype)

    def photo_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, h, w, D) grids -> h0, c0 (B, H), regions V (B, R, D) and their projection enc (B, R, A)."""
        V = self.regions(features)
        mean = self.feature_dropout(V.mean(1))  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), V, self.att_enc(V)

    def attend(self, q: torch.Tensor, beta: torch.Tensor, V: torch.Tensor, enc: torch.Tensor, rowwise: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated context (N, D) and the attention weights alpha (N, R) of rows whose hidden state gave the
        query ``q`` = W h (N, A) and the gate's logits ``beta`` = W_beta h + b (N, D), each row over its photo's
        regions V (N, R, D) and their projection enc (N, R, A). ``rowwise``: the decoding step's reduction."""
        t = torch.tanh(enc + q[:, None, :])  # (N, R, A)
        if not rowwise:  # teacher forcing (training): att_out as trained, under autocast
            e = self.att_out(t).squeeze(-1)  # (N, R)
        else:  # the decoding step: each row reduced alone in the same order whatever the batch (a matrix product
            # over N x R rows picks its kernel by N; a photo alone must equal it in a batch). Training keeps the
            # Linear: the same maths, but a fit with this reduction under bf16 autocast learned visibly less
            # focused maps (tests/test_e2e.py: 2.0x chance against 2.7x, measured 2026-12-07).
            e = (t * self.att_out.weight[0]).sum(-1) + self.att_out.bias  # (N, R)
        alpha = torch.softmax(e.float(), dim=-1).to(V.dtype)
        context = torch.bmm(alpha[:, None, :], V).squeeze(1)  # (N, D)
        return torch.sigmoid(beta) * context, alpha

    # -- decoding: the step, written once over the products it declares -----------------------------
    def step_products(self) -> dict[str, Product]:
        """The step's matrix products (gate rows i, f, o, 2g: ``base.packed_gates``):

        - ``word``: the input gates of every word, embedding x W_ih[:, :E] + b_ih, (V, 4H): a table
        - ``context``: W_ih[:, E:], the context's input gates (the context has its own range, so int8 scales
          it on its own)
        - ``hidden``: [output layer; att_hid; gate; W_hh] for the new h: the logits now, and the next step's
          query, gate and recurrent gates (``state.carry``)
        - ``carry``: the same rows without the output layer, for the initial state's h
        """
        E, H, A, D = self.embed_dim, self.hidden_dim, self.attention_dim, self.feature_dim
        w_ih, b_ih = packed_gates(self.cell.weight_ih, H), packed_gates(self.cell.bias_ih, H)
        word = nn.functional.linear(self.embed.weight.float(), w_ih[:, :E].float(), b_ih.float())
        hidden = Product(
            torch.cat([self.head.weight, self.att_hid.weight, self.gate.weight, packed_gates(self.cell.weight_hh, H)]),
            torch.cat([self.head.bias, self.att_hid.weight.new_zeros(A), self.gate.bias, packed_gates(self.cell.bias_hh, H)]),
            Input.HIDDEN, parts=(self.vocab_size, A + D + 4 * H), logits=True)
        return {"word": Product(word, None, Input.TOKEN), "context": Product(w_ih[:, E:], None, Input.ANY),
                "hidden": hidden, "carry": hidden.tail(A + D + 4 * H)}

    def initial_state(self, features: torch.Tensor, products: Products) -> DecoderState:
        """(B, h, w, D) grids -> one row per photo: h, c, the carried products of h, and the photo's regions."""
        h, c, V, enc = self.photo_state(features)
        return DecoderState((h,), (c,), (products["carry"](h),), (V, enc))

    def step(self, tokens: torch.Tensor, state: DecoderState, products: Products | None = None,
             return_attention: bool = False):
        """One decoding step. tokens (N,) -> log-probabilities (N, V), the new state, and with
        ``return_attention`` the attention weights (N, R) that chose this word's context."""
        P = products if products is not None else self.products()
        A, D = self.attention_dim, self.feature_dim
        q, beta, rec = state.carry[0].split([A, D, 4 * self.hidden_dim], 1)  # made with h by the last step
        rows = state.per_row()  # (N, R, D), (N, R, A): gathered once per search, not at every step
        context, alpha = self.attend(q, beta, *rows, rowwise=True)  # (N, D), (N, R); any batch, the same bits
        h, c = lstm_update(P["word"](tokens) + P["context"](context) + rec, state.c[0])  # (N, H) each
        logits, carry = P["hidden"](h)  # (N, V), (N, A + D + 4H)
        new = DecoderState((h,), (c,), (carry,), state.photos, state.image, rows if state.image is not None else ())
        logp = torch.log_softmax(logits.float(), dim=-1)
        return (logp, new, alpha) if return_attention else (logp, new)

    # -- teacher-forced training -----------------------------------------------------------------
    def unroll(self, features: torch.Tensor, inputs: torch.Tensor, images: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over padded inputs (S, T) -> hidden states (S, T, H) and attention (S, T, R),
        on the model's own layers (dropout and gradient: training).

        Rows past their length compute on padding; callers keep the real positions only. ``images`` (S,):
        the photo of each row, an index into ``features`` (None: row i is photo i). SCST scores several
        captions per photo: the regions are then projected once per photo, not once per caption.
        """
        h, c, V, enc = self.photo_state(features)  # (B, H) x2, (B, R, D), (B, R, A)
        if images is not None:  # rows -> their photo's state and regions, gathered once for every step
            h, c, V, enc = h[images], c[images], V[images], enc[images]
        emb = self.embed_dropout(self.embed(inputs))  # (S, T, E)
        hs, alphas = [], []
        for t in range(inputs.shape[1]):
            context, alpha = self.attend(self.att_hid(h), self.gate(h), V, enc, rowwise=False)
            h, c = self.cell(torch.cat([emb[:, t], context], dim=-1), (h, c))
            hs.append(h)
            alphas.append(alpha)
        return torch.stack(hs, 1), torch.stack(alphas, 1)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits, with ``ShowAndTell.forward``'s contract: (logits (N, V), targets (N,))
        over the N = sum(lengths - 1) predicted positions, in the packed (time-major) order.

        Args:
            features: (B, h, w, D) grids.
            captions: (S, T) token ids ``<start> w1 .. wn <end> <pad>..``.
            lengths: (S,) real tokens per row, ``<start>`` and ``<end>`` included.
            images: (S,) the photo of each caption, an index into ``features`` (None: S = B, row i is photo i).
        """
        steps = lengths.to("cpu", torch.int64) - 1
        hs, _ = self.unroll(features, captions[:, :-1], images)  # (S, T-1, H)
        packed_h = pack_padded_sequence(hs, steps, batch_first=True, enforce_sorted=False).data
        packed_tgt = pack_padded_sequence(captions[:, 1:], steps, batch_first=True, enforce_sorted=False).data
        return self.head(self.out_dropout(packed_h)), packed_tgt


def attention_penalty(alphas: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Xu et al.'s doubly stochastic regulariser, as a mean: mean over rows and regions of
    (1 - sum over the caption's real steps of alpha)^2.

    Args:
        alphas: (B, T, R) attention weights of a teacher-forced pass.
        lengths: (B,) real tokens per row, specials included (a row has lengths - 1 steps).
    """
    steps = (lengths.to(alphas.device) - 1)[:, None]  # (B, 1)
    real = (torch.arange(alphas.shape[1], device=alphas.device)[None, :] < steps).to(alphas.dtype)  # (B, T)
    coverage = (alphas * real[..., None]).sum(1)  # (B, R)
    return ((1.0 - coverage.float()) ** 2).mean()
