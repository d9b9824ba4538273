"""Inference precision of a decoder's per-step weights on a CPU: float32, bfloat16 or int8.

    precision, _ = use_precision(model)   # env STORYTELLER_PRECISION, else what this CPU does fastest;
                                          # model.step now reads low-precision weights

At batch 1 a decoder step is bound by memory bandwidth: the pooled model's LSTM layers and output layer
read ~22 MB of float32 weights per step. ``prepare`` packs the step's matrices once:

- ``int8``: per-output-channel int8 weights with float activations quantised per row (PyTorch's
  dynamic-quantisation kernel, fbgemm/oneDNN; any x86-64 CPU with AVX2), so a row's result does not
  depend on the rows that share its batch: a hidden state (always within [-1, 1]) on that fixed
  range, any other input on its own max |x|. A quarter of the bytes. The product that holds the output
  layer quantises its activations to 7 bits: on AVX2, fbgemm multiplies 8-bit activations by int8
  weights in 16-bit sums that saturate, which costs the logits (not the gates) accuracy.
- ``bf16``: bfloat16 weights and activations, float32 state. Fast only where the CPU has bfloat16
  instructions (AVX-512 BF16 or AMX); elsewhere it is emulated and slower than float32.
- ``fp32``: the model's own weights (nothing packed).

A matrix whose input is a word embedding becomes a float32 table, one row per word (the embedding times
the matrix, computed once): the step reads the row of each token instead of multiplying. Every other
matrix that reads the same vector is stacked with it, so each new hidden state is multiplied once: the
pooled decoder's layer l by [W_ih(l+1); W_hh(l)], its last layer by [output layer; W_hh]; the
attention decoder's h by [output layer; query; gate; W_hh] (and its context by W_ih's context part).
The part meant for the next step travels in the state. A pooled step makes one product per layer, an
attention step two: a step's products cost more in call overhead than in arithmetic on a CPU.

The pooled decoder's ``init_state`` stacks its two projections of the photo's features (h and c of every
layer) into one product (``init``). Made once per photo, on an unbounded input, it does not go int8 (that
cost beam quality) or bfloat16: it gets float16 weights with float32 activations and sums (fbgemm's
``linear_dynamic_fp16``, where PyTorch has it; else float32): half the bytes of float32, with errors
near 1e-3 of float32's. The attention decoder's projections of the photo and the LSTM state stay float32;
so does training: packed weights are used only in eval mode and only while the model's weights are the
ones that were packed (any in-place change, e.g. an optimizer step, makes ``step`` fall back to the
model's own weights). A GPU keeps its own path (no packing; autocast where the caller asks for it).

``resolve_precision("auto", model)`` times one batch-1 step of each precision this CPU supports (a few
tens of ms, once per load) and keeps the fastest; ``STORYTELLER_PRECISION`` or an explicit value
overrides it. The quality cost is measured on the shipped models (tests/test_precision.py, README).
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16", "int8")
ENV = "STORYTELLER_PRECISION"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it is not readable, e.g. not Linux); read once."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True on CPUs with bfloat16 instructions: AMX tiles or AVX-512 BF16 (flags, or PyTorch's own probe)."""
    if {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return True
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent means "don't know"
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def supported_precisions(device: torch.device | str = "cpu") -> list[str]:
    """Precisions worth trying on ``device``: fp32 always; on a CPU also int8 where PyTorch has a
    dynamic-quantisation engine, and bf16 where the CPU has bfloat16 instructions."""
    if torch.device(device).type != "cpu":
        return ["fp32"]
    out = ["fp32"]
    if cpu_has_bf16():
        out.append("bf16")
    if {"x86", "fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines) and _int8_works():
        out.append("int8")
    return out


@functools.lru_cache(maxsize=1)
def _fp16_works() -> bool:
    try:
        _Fp16Linear(torch.ones(4, 4), torch.zeros(4))(torch.ones(1, 4))
        return True
    except Exception:  # no fbgemm (not x86), or a PyTorch without the op
        return False


@functools.lru_cache(maxsize=1)
def _int8_works() -> bool:
    try:
        _Int8Linear(torch.ones(4, 4), torch.zeros(4))(torch.ones(1, 4))
        return True
    except Exception:  # an engine listed but unusable, or a PyTorch without quantized ops
        return False


class _Fp32Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Fp16Linear:
    """y = x W^T + b with W stored float16 (fbgemm's packed format), x and the sums float32: for the
    products made once per photo in the int8 and bf16 precisions (fast on any x86-64 CPU with AVX2 and F16C)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(),
                                                              None if bias is None else bias.detach().float())
        self.op = torch.ops.quantized.linear_dynamic_fp16.default

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.float().contiguous(), self.packed)


class _Bf16Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class _Int8Linear:
    """y = x W^T + b with W stored int8 per output channel (symmetric) and x quantised so that no row
    depends on the others in its batch.

    PyTorch's dynamic int8 linear quantises its input with one scale for the whole batch, so a row's
    result would depend on the other rows beside it (greedy next to beam rows, one photo next to
    another). Each row is scaled to max |x| = 1 first (unless ``unit_range``, below), and every row gets
    two more inputs, +1 and -1, whose weights are zero: the batch's range is always [-1, 1], so every row
    is quantised the same way whatever shares its batch, and the integer product is exact, so a row's
    output is the same alone or in any batch. (Two input columns cost less than the extra row a fixed
    anchor row would need.)

    An LSTM's hidden state lies in [-1, 1] already (h = o * tanh(c)), and nearly every row reaches
    close to 1 (median max |h| 0.99-1.0 on the shipped models): with ``unit_range`` the rows are not
    rescaled, the +1 / -1 inputs alone fix the range, and the bias is added inside the kernel, which saves
    four small operations per product. Rows stay independent of their batch the same way, as long as
    every input is within [-1, 1]: the callers pass tanh / sigmoid products only (a value beyond would
    widen the batch's range and change the other rows' numbers).

    Args:
        weight: (out, in).
        bias: (out,) or None.
        reduce_range: quantise activations to 7 bits instead of 8. fbgemm's AVX2 kernel adds pairs of
            uint8 x int8 products in int16 and saturates where large activations meet large weights;
            7-bit activations cannot overflow (PyTorch's own ``nn.quantized.dynamic.Linear`` sets it).
        unit_range: the inputs always lie within [-1, 1] (hidden states; not checked): no per-row rescaling.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool = False,
                 unit_range: bool = False):
        import warnings

        w = weight.detach().float()
        w = torch.cat([w, w.new_zeros(w.shape[0], 2)], 1)  # the +1 / -1 inputs add nothing
        scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # PyTorch flags its quantized-tensor API as deprecated; it still works
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            # rescaled rows: no bias in the pack, it is added after the per-row rescale
            in_pack = None if bias is None or not unit_range else bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(q, in_pack)
        self.op = torch.ops.quantized.linear_dynamic.default  # the overload, looked up once (microseconds a call)
        self.bias = None if bias is None or unit_range else bias.detach().float()
        self.reduce_range, self.unit_range = reduce_range, unit_range
        self.range = torch.tensor([[1.0, -1.0]])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                      # (rows, in)
        # unit range: |x| <= 1 already, the range columns set the scale and the kernel adds the bias
        s = None if self.unit_range else \
            torch.linalg.vector_norm(flat, float("inf"), 1, keepdim=True).clamp_min_(1e-30)  # (rows, 1) max |x|
        y = self.op(torch.cat([flat if s is None else flat / s, self.range.expand(flat.shape[0], 2)], 1),
                    self.packed, self.reduce_range)  # (rows, out)
        if s is not None:
            y = y * s if self.bias is None else torch.addcmul(self.bias, y, s)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


_KINDS: dict[str, Callable] = {"fp32": _Fp32Linear, "bf16": _Bf16Linear, "int8": _Int8Linear}
SEVEN_BIT_LAYERS = ("head",)  # step matrices whose int8 activations are quantised to 7 bits
PER_PHOTO = ("init",)  # products made once per photo (init_state): float16 weights (else float32) in bf16 and int8


class _Table:
    """A float32 lookup table: token ids (N,) -> rows (N, out). A matrix product whose input is an
    embedding row is precomputed for every word once, so the step reads one row instead of a matrix."""

    def __init__(self, table: torch.Tensor):
        self.table = table.detach().float().contiguous()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, ids)


StepMatrices = dict[str, "tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor"]


class PackedWeights:
    """The step's matrices of one model in one precision: ``name -> callable(x) -> y``.

    Args:
        precision: one of ``PRECISIONS``.
        linears: ``name -> (weight (out, in), bias (out,) or None)``, packed in ``precision``; or
            ``name -> table (V, out)``, a float32 lookup by token id in every precision.
        sources: the tensors the packs were made from (the model's parameters: some packs are derived,
            joined or stacked); an in-place change to any of them makes the packs stale.
        unit_range: the names whose inputs always lie within [-1, 1] (LSTM hidden states); int8 then
            skips the per-row rescaling.
        seven_bit: the names whose int8 activations are quantised to 7 bits (the output layer's product,
            and any pack holding some of its rows, so that they compute the same numbers).
    """

    def __init__(self, precision: str, linears: StepMatrices, sources: list[torch.Tensor],
                 unit_range: Collection[str] = (), seven_bit: Collection[str] = SEVEN_BIT_LAYERS):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        # int8: the product holding the output layer gets 7-bit activations (reduce_range). With 8 bits,
        # fbgemm's saturating 16-bit sums on AVX2 cost the attention model 0.005 greedy BLEU-4 on validation
        # (0.1773 against fp32's 0.1827). The matrices stacked with the output layer get 7 bits with it; the
        # other gate products keep 8 (7 bits on every product cost the attention model 0.0053 beam CIDEr-D).
        # Measured on the shipped models: every figure within 0.003 of fp32 (README, tests/test_precision.py).
        self.ops = {}
        for name, spec in linears.items():
            if isinstance(spec, torch.Tensor):
                self.ops[name] = _Table(spec)
            elif name in PER_PHOTO and precision != "fp32":
                self.ops[name] = (_Fp16Linear if _fp16_works() else _Fp32Linear)(*spec)
            elif precision == "int8":
                self.ops[name] = _Int8Linear(*spec, reduce_range=name in seven_bit,
                                             unit_range=name in unit_range)
            else:
                self.ops[name] = _KINDS[precision](*spec)
        # what the packs were made from, and their version counters -- an in-place update bumps one
        self._sources, self._versions = list(sources), [t._version for t in sources]

    def fresh(self) -> bool:
        """True while the model's weights are still the ones that were packed (checked every step)."""
        return [t._version for t in self._sources] == self._versions

    def __getitem__(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.ops[name]


def prepare(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Pack ``model``'s step weights in ``precision`` (``fp32`` removes any packing). Returns the model.

    Args:
        model: a decoder with ``step_linears()`` (``ShowAndTell``, ``ShowAttendTell``).
        precision: ``fp32``, ``bf16`` or ``int8``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or not hasattr(model, "step_linears"):
        model._packed = None
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"precision {precision!r} is for CPU inference; a GPU keeps its own path (use fp32)")
    with torch.no_grad():
        # the step's matrices may be derived (joined, stacked, a word table): staleness follows every parameter
        model._packed = PackedWeights(precision, model.step_linears(), sources=list(model.parameters()),
                                      unit_range=getattr(model, "step_unit_range", ()),
                                      seven_bit=getattr(model, "step_seven_bit", SEVEN_BIT_LAYERS))
    return model


def packed(model: torch.nn.Module) -> PackedWeights | None:
    """The packed weights ``model.step`` may use now: set, in eval mode and still fresh; else None."""
    p = getattr(model, "_packed", None)
    if p is None or model.training or not p.fresh():
        return None
    return p


@torch.inference_mode()
def time_step(model: torch.nn.Module, features: torch.Tensor, repeats: int = 7, rows: int = 1) -> float:
    """Median ms of one ``model.step`` for ``rows`` rows (after two warm-up steps), in the model's
    current precision. Each step continues from the state the last one returned, as in a search (a
    packed step carries part of the next step's work in its state).

    Args:
        model: the decoder (eval mode).
        features: one photo's features, (1, F) or (1, h, w, D).
        repeats: timed steps.
        rows: rows per step (1: one greedy caption; beam rows for a beam search).
    """
    state = model.init_state(features)
    if rows > 1:
        state = model.select_state(state, torch.zeros(rows, dtype=torch.long))
    tokens = torch.full((rows,), 4, dtype=torch.long)  # a word: ids 0-3 are the special tokens
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        state = model.step(tokens, state)[1]
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def resolve_precision(requested: str | None, model: torch.nn.Module | None = None,
                      features: torch.Tensor | None = None) -> tuple[str, dict[str, float]]:
    """The precision to run ``model`` in, and the step timings that chose it (ms; empty if none ran).
    The model is left as it was; :func:`use_precision` also packs it.

    ``requested`` (else ``$STORYTELLER_PRECISION``, else ``auto``): a name from ``PRECISIONS``, or
    ``auto``: on a CPU, time a batch-1 step in each supported precision and keep the fastest, fp32
    unless another is at least 10% faster; on a GPU, fp32.

    Args:
        requested: ``auto``, ``fp32``, ``bf16``, ``int8`` or None.
        model: the decoder (needed for ``auto``).
        features: one photo's features for the timing (``auto``; default: zeros of the model's shape).

    Raises:
        ValueError: an unknown name.
    """
    best, timings, _ = _resolve(requested, model, features)
    return best, timings


def use_precision(model: torch.nn.Module, requested: str | None = None) -> tuple[str, dict[str, float]]:
    """:func:`resolve_precision`, then :func:`prepare` ``model`` in the chosen precision, reusing the
    pack that ``auto`` timed instead of packing it again. Returns what ``resolve_precision`` returns.

    Args:
        model: the decoder (eval mode).
        requested: ``auto``, ``fp32``, ``bf16``, ``int8`` or None (then ``$STORYTELLER_PRECISION``, else auto).
    """
    best, timings, packs = _resolve(requested, model, None)
    if best in packs:
        model._packed = packs[best]
    else:
        prepare(model, best)
    return best, timings


def _resolve(requested: str | None, model: torch.nn.Module | None, features: torch.Tensor | None
             ) -> tuple[str, dict[str, float], dict[str, PackedWeights | None]]:
    """resolve_precision's work, plus the packs ``auto`` made while timing (precision -> pack)."""
    requested = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if requested != "auto":
        if requested not in PRECISIONS:
            source = "" if requested != os.environ.get(ENV, "").strip().lower() else f" (from ${ENV})"
            raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {requested!r}{source}")
        return requested, {}, {}
    if model is None:
        return "fp32", {}, {}
    device = next(model.parameters()).device
    candidates = supported_precisions(device)
    if len(candidates) == 1:
        return "fp32", {}, {}
    if features is None:
        shape = (1, *model.grid, model.feature_dim) if getattr(model, "has_attention", False) and model.grid \
            else (1, model.feature_dim)
        features = torch.zeros(shape)
    timings, packs = {}, {}
    was = getattr(model, "_packed", None)
    try:
        for p in candidates:
            packs[p] = prepare(model, p)._packed
            timings[p] = time_step(model, features)
    finally:
        model._packed = was
    best = min(timings, key=timings.get)
    if timings[best] > 0.9 * timings["fp32"]:
        best = "fp32"
    return best, timings, packs
