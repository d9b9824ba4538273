"""The Show-Attend-Tell decoder: an LSTM that looks over the CNN's feature grid at every word.

    grid (B, h, w, D) -> regions V (B, R=h*w, D) ---------------------------------+
      mean over R --Dropout--Linear--tanh--> h0, c0 (1, B, H)                     |
      V --Linear--> enc (B, R, A)  (computed once per photo, reused every step)  |
    each step t, from the previous hidden state h (B, H):                          |
      e = w . tanh(enc + W h)          (B, R)   additive attention                 |
      alpha = softmax_R(e)             (B, R)   where the model looks              |
      z = sigmoid(W_beta h) * sum_R alpha V      (B, D)  gated context  <----------+
      h, c = LSTMCell([embed(word); z], (h, c))
      log p(next word) = log_softmax(Linear(Dropout(h)))

This is Xu et al. 2015 ("Show, Attend and Tell") soft attention with its gating scalar beta and its
doubly stochastic regularisation, ``attention_penalty``: mean over regions of (1 - sum_t alpha_t)^2,
which asks the model to look at every region over the whole caption rather than stare at one.

State for decoding: ``(h, c, img, V, enc)``: h, c (1, N, H) per row; ``img`` (N,) the photo each row
belongs to (None: row i is photo i), and the per-photo tensors V (B, R, D) and enc (B, R, A) that
rows share. Beam search copies rows, never photos, so the grid is projected once per photo. A step on
packed weights (``storyteller.precision``) adds a sixth part, ``pre`` (N, A + D + 4H): the products
of h the next step needs (query, gate, recurrent gates), made with the output layer in one product.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from torch.nn.utils.rnn import pack_padded_sequence

from .model import HubDecoder, lstm_update, packed_gates
from .precision import packed
from .vocab import Vocabulary

DECODER = "show_attend_tell"
AttentionState = tuple  # (h (1, N, H), c (1, N, H), img (N,) | None, V (B, R, D), enc (B, R, A)[, pre (N, A+D+4H)])


class ShowAttendTell(
    HubDecoder,
    nn.Module,
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

    decoder_type = DECODER
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
        decoder: str = DECODER,
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

    # -- the decoding protocol -------------------------------------------------------------------
    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """Grids (B, h, w, D) or regions (B, R, D) -> regions (B, R, D) in the weights' dtype."""
        if features.dim() == 4:
            features = features.flatten(1, 2)
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"an attention decoder needs feature grids (B, h, w, {self.feature_dim}) or regions "
                             f"(B, R, {self.feature_dim}), got shape {tuple(features.shape)}; pooled (B, D) features "
                             "do not have the regions it attends over (extract with --grid)")
        return features.to(self.head.weight.dtype)

    def init_state(self, features: torch.Tensor, images: torch.Tensor | None = None) -> AttentionState:
        """Grids (B, h, w, D) -> the decoding state ``(h, c, None, V, enc)`` (see the module docstring).

        ``images`` (S,): a state of S rows, row s for photo ``images[s]``, each row with its own copy of
        its photo's regions (SCST's samples: the regions are projected once per photo, and no step
        gathers them again). None: one row per photo."""
        V = self.regions(features)  # (B, R, D)
        mean = self.feature_dropout(V.mean(1))  # (B, D)
        h = torch.tanh(self.init_h(mean))[None]  # (1, B, H)
        c = torch.tanh(self.init_c(mean))[None]
        enc = self.att_enc(V)  # (B, R, A)
        if images is not None:
            return h[:, images], c[:, images], None, V[images], enc[images]
        return h, c, None, V, enc

    def select_state(self, state: AttentionState, rows: torch.Tensor) -> AttentionState:
        h, c, img, V, enc = state[:5]
        out = (h.index_select(1, rows), c.index_select(1, rows), rows if img is None else img[rows], V, enc)
        return out + (state[5].index_select(0, rows),) if len(state) > 5 else out

    def scatter_state(self, state: AttentionState, rows: torch.Tensor, sub: AttentionState) -> AttentionState:
        h, c, img, V, enc = state[:5]
        h, c = h.clone(), c.clone()
        h[:, rows], c[:, rows] = sub[0], sub[1]
        if len(state) > 5 and len(sub) > 5:  # pre: a cache the next step can rebuild, kept only where both have it
            pre = state[5].clone()
            pre[rows] = sub[5]
            return h, c, img, V, enc, pre
        return h, c, img, V, enc  # rows never change photo within a step

    def attend(self, h: torch.Tensor, img: torch.Tensor | None, V: torch.Tensor, enc: torch.Tensor,
               q: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated context (N, D) and attention weights alpha (N, R) for hidden states h (N, H).
        ``q`` (N, A) and ``beta`` (N, D): ``att_hid(h)`` and ``gate(h)`` where the caller computed them
        already (the packed step does, in one product with the recurrent matrix)."""
        q = self.att_hid(h) if q is None else q  # (N, A)
        if img is not None and V.shape[0] == 1:  # one photo (the app): all rows share its regions, no copies
            e = self.att_out(torch.tanh(enc[0] + q[:, None, :])).squeeze(-1)  # (N, R)
            alpha = torch.softmax(e.float(), dim=-1).to(V.dtype)
            context = alpha @ V[0]  # (N, D)
        else:
            if img is not None:  # rows -> their photo's regions
                V, enc = V[img], enc[img]  # (N, R, D), (N, R, A)
            e = self.att_out(torch.tanh(enc + q[:, None, :])).squeeze(-1)  # (N, R)
            alpha = torch.softmax(e.float(), dim=-1).to(V.dtype)
            context = torch.bmm(alpha[:, None, :], V).squeeze(1)  # (N, D)
        beta = self.gate(h) if beta is None else beta  # (N, D)
        return torch.sigmoid(beta) * context, alpha

    def step(self, tokens: torch.Tensor, state: AttentionState, return_attention: bool = False):
        """One decoder step. tokens (N,) -> log-probabilities (N, V), the new state, and with
        ``return_attention`` the attention weights (N, R) that chose this word's context."""
        h, c, img, V, enc = state[:5]
        fast = packed(self)  # low-precision copies of the step's weights (storyteller.precision), or None
        if fast is not None:  # nn.LSTMCell on packed weights, gate rows i, f, o, 2g (model.packed_gates)
            A, D, G = self.att_hid.out_features, self.gate.out_features, 4 * self.hidden_dim
            # pre: every product of h (attention query, gate, recurrent gates), made by the last step together
            # with its logits; a state from init_state has it made here
            pre = state[5] if len(state) > 5 else fast["pre"](h[0])
            q, beta, hh = pre.split([A, D, G], 1)  # (N, A), (N, D), (N, 4H)
            context, alpha = self.attend(h[0], img, V, enc, q=q, beta=beta)
            # the word's input gates are a table row; the context (its own range) gets its own product, so
            # int8 quantises it with its own scale
            gates = fast["word"](tokens) + fast["ih_context"](context) + hh  # (N, 4H)
            h1, c1 = lstm_update(gates, c[0])
            out = fast["head"](h1)  # (N, vocab + A + D + 4H): the logits, and the next step's pre
            logp = torch.log_softmax(out[:, :-(A + D + G)].float(), dim=-1)
            new = (h1[None], c1[None], img, V, enc, out[:, -(A + D + G):])
        else:
            context, alpha = self.attend(h[0], img, V, enc)
            x = torch.cat([self.embed_dropout(self.embed(tokens)), context], dim=-1)  # (N, E + D)
            h1, c1 = self.cell(x, (h[0], c[0]))
            logp = torch.log_softmax(self.head(self.out_dropout(h1)).float(), dim=-1)
            new = (h1[None], c1[None], img, V, enc)
        return (logp, new, alpha) if return_attention else (logp, new)

    step_unit_range = ("head", "pre")  # packed products whose input is the hidden state, within [-1, 1]
    step_seven_bit = ("head", "pre")  # int8: 7-bit activations for the output layer's product and its rows in pre

    def step_linears(self) -> dict[str, Any]:
        """The matrices the packed step multiplies by, for ``storyteller.precision.prepare``: name ->
        (weight, bias), or name -> a lookup table by token id.

        - ``word``: the input gates of every word, embedding x W_ih[:, :E] + b_ih, (V, 4H): a row lookup
        - ``ih_context``: W_ih[:, E:], the context's input gates
        - ``head``: [output layer; att_hid; gate; W_hh] stacked, (V + A + D + 4H, H): every product of
          the new h in one, the logits now and the rest for the next step
        - ``pre``: the head's rows without the output layer, for the first step's initial state

        Gate rows are i, f, o, 2g (``model.packed_gates``), so the gates are one sigmoid.
        """
        E, cell, H = self.embed_dim, self.cell, self.hidden_dim
        with torch.no_grad():
            w = torch.cat([self.head.weight, self.att_hid.weight, self.gate.weight, packed_gates(cell.weight_hh, H)], 0)
            b = torch.cat([self.head.bias, self.att_hid.weight.new_zeros(self.att_hid.out_features), self.gate.bias,
                           packed_gates(cell.bias_hh, H)])
            w_ih, b_ih = packed_gates(cell.weight_ih, H), packed_gates(cell.bias_ih, H)
            word = nn.functional.linear(self.embed.weight.float(), w_ih[:, :E].float(), b_ih.float())
            V = self.head.out_features
            return {"word": word, "ih_context": (w_ih[:, E:], None), "head": (w, b), "pre": (w[V:], b[V:])}

    # -- teacher-forced training -----------------------------------------------------------------
    def unroll(self, features: torch.Tensor, inputs: torch.Tensor, images: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over padded inputs (S, T) -> hidden states (S, T, H) and attention (S, T, R).

        Rows past their length compute on padding; callers keep the real positions only. ``images`` (S,):
        the photo of each row, an index into ``features`` (None: row i is photo i). SCST scores several
        captions per photo: the regions are then projected once per photo, not once per caption.
        """
        h, c, _, V, enc = self.init_state(features, images)  # (1, S, H) x2, (S, R, D), (S, R, A)
        h, c = h[0], c[0]
        emb = self.embed_dropout(self.embed(inputs))  # (B, T, E)
        hs, alphas = [], []
        for t in range(inputs.shape[1]):
            context, alpha = self.attend(h, None, V, enc)
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
