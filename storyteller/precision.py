"""How a decoder's step products are computed: float32, bfloat16 or int8 weights (the *precision*).

    model.precision = "int8"             # or use_precision(model): $STORYTELLER_PRECISION, else the CPU's rule
    products = model.products()          # the step's matrices packed in that precision, made once
    logp, state = model.step(tokens, state, products)

A decoder declares its step's matrix products once (``step_products()``, a dict of :class:`Product`): what
each product multiplies (:class:`Input`: a token's row of a table, an LSTM hidden state within [-1, 1], any
other activation, or a photo's features once per photo) and how its output splits into parts. It writes its
step once, calling those products; this module makes them in a precision:

- ``fp32``: float32 weights.
- ``bf16``: bfloat16 weights and activations, float32 sums and state. Fast where the CPU has bfloat16
  instructions (AVX-512 BF16 or AMX); elsewhere it is emulated and slower than float32.
- ``int8``: per-output-channel int8 weights, activations quantised per row (PyTorch's dynamic-quantisation
  kernel, fbgemm/oneDNN; any x86-64 CPU with AVX2), so a row's result never depends on the rows that share its
  batch: a hidden state on the fixed range [-1, 1], any other input on its own max |x|. A quarter of float32's
  bytes: at batch 1 a step is bound by memory bandwidth (the pooled model reads ~22 MB of float32 weights).
  The product holding the output layer (``Product.logits``) quantises its activations to 7 bits: fbgemm's AVX2
  kernel sums pairs of 8-bit products in 16 bits that saturate, which costs the logits accuracy.

In every precision a ``TOKEN`` product is a float32 table (the embedding times the matrix for every word,
made once) and a ``PHOTO`` product (made once per photo, on an unbounded input) gets float16 weights with
float32 activations and sums in bf16 and int8 (fbgemm's ``linear_dynamic_fp16``; float32 where PyTorch lacks
it): int8 there cost beam quality. A GPU runs float32 whatever is asked.

Products are snapshots of the weights: ``HubDecoder.products()`` makes them again whenever a weight changed
(:func:`weights_signature`: another tensor, storage, version counter, or any of the sampled values that an
in-place edit through ``.data`` changes, which PyTorch does not version).

The precision ``auto`` (the default) follows a fixed rule (:func:`auto_precision`), never a timing race, so one
machine always gives one photo the same caption: int8 where PyTorch's int8 kernel runs, else bf16 where the
CPU has bfloat16 instructions, else fp32. Measured 2026-12-02 on an AMX CPU, one pooled step at batch 1:
int8 0.54 ms, bf16 1.04 ms, fp32 1.28 ms (docs/benchmarks.md).
"""
from __future__ import annotations

import enum
import functools
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"
ENV = "STORYTELLER_PRECISION"
INT8_MAX = 127  # symmetric int8 weights use -127..127, so the scale is the same on both sides of zero
WEIGHT_SCALE_FLOOR = 1e-12  # an all-zero weight row still gets a valid (positive) quantisation scale
ROW_MAX_FLOOR = 1e-30  # an all-zero input row is divided by this instead of 0: its zeros stay zeros
FINGERPRINT_SAMPLES = 61  # values sampled from each weight to notice in-place edits through .data


class Input(enum.Enum):
    """What a product multiplies, which decides how each precision computes it."""

    TOKEN = "token"  # a word's embedding: the product is a table with one row per word, read by token id
    HIDDEN = "hidden"  # an LSTM hidden state, o * tanh(c): every value within [-1, 1]
    ANY = "any"  # any other activation (unbounded)
    PHOTO = "photo"  # a photo's features, once per photo (init_state), not per step


@dataclass(frozen=True)
class Product:
    """One matrix product of a decoder's step: ``y = x W^T + b`` (``TOKEN``: ``y = W[token]``).

    Args:
        weight: (out, in); for ``TOKEN`` the table (vocab, out).
        bias: (out,) or None.
        reads: what ``x`` is (:class:`Input`).
        parts: the output's split into consecutive parts of these sizes (several matrices that read the same
            input, stacked so that the input is multiplied once), or () for one output.
        logits: the product holds the output layer's rows (int8: 7-bit activations).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    reads: Input
    parts: tuple[int, ...] = ()
    logits: bool = False

    def tail(self, size: int) -> Product:
        """The product of the last ``size`` output rows alone, computed as this one computes them (same
        input range and activation bits, so int8 gives those rows the very same numbers)."""
        return replace(self, weight=self.weight[-size:], bias=None if self.bias is None else self.bias[-size:],
                       parts=())


# -- the products in each precision ---------------------------------------------------------------

class _Table:
    """A float32 lookup table: token ids (N,) -> rows (N, out)."""

    def __init__(self, table: torch.Tensor):
        self.table = table.detach().float().contiguous()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, ids)


class _Fp32Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Fp16Linear:
    """y = x W^T + b with W stored float16 (fbgemm's packed format), x and the sums float32 (any x86-64 CPU
    with AVX2 and F16C)."""

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
    output is the same alone or in any batch.

    An LSTM's hidden state lies in [-1, 1] already, and nearly every row reaches close to 1 (median max
    |h| 0.99-1.0 on the shipped models): with ``unit_range`` the rows are not rescaled, the +1 / -1 inputs
    alone fix the range, and the bias is added inside the kernel. Every input must then be within [-1, 1]
    (a value beyond would widen the batch's range and change the other rows' numbers).

    Args:
        weight: (out, in).
        bias: (out,) or None.
        reduce_range: 7-bit activations instead of 8 (fbgemm's AVX2 kernel adds pairs of uint8 x int8
            products in int16 and saturates where large activations meet large weights; 7 bits cannot).
        unit_range: the inputs always lie within [-1, 1] (hidden states; not checked): no per-row rescaling.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool = False,
                 unit_range: bool = False):
        w = weight.detach().float()
        w = torch.cat([w, w.new_zeros(w.shape[0], 2)], 1)  # the +1 / -1 inputs add nothing
        scale = (w.abs().amax(1) / INT8_MAX).clamp_min(WEIGHT_SCALE_FLOOR).double()
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
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (rows, in)
        # unit range: |x| <= 1 already, the range columns set the scale and the kernel adds the bias
        s = None if self.unit_range else \
            torch.linalg.vector_norm(flat, float("inf"), 1, keepdim=True).clamp_min_(ROW_MAX_FLOOR)  # (rows, 1)
        y = self.op(torch.cat([flat if s is None else flat / s, self.range.expand(flat.shape[0], 2)], 1),
                    self.packed, self.reduce_range)  # (rows, out)
        if s is not None:
            y = y * s if self.bias is None else torch.addcmul(self.bias, y, s)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


class _Split:
    """A product whose output is several stacked parts: returns them as a tuple of views."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], parts: tuple[int, ...]):
        self.op, self.parts = op, list(parts)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.op(x).split(self.parts, -1)


def compute(product: Product, precision: str) -> Callable:
    """The callable that makes ``product`` in ``precision``: x -> y (or a tuple of parts when it has parts).

    Args:
        product: the declaration.
        precision: one of ``PRECISIONS``.
    """
    if product.reads is Input.TOKEN:
        op = _Table(product.weight if product.bias is None else product.weight + product.bias)
    elif product.reads is Input.PHOTO and precision != "fp32":
        op = (_Fp16Linear if _fp16_works() else _Fp32Linear)(product.weight, product.bias)
    elif precision == "int8":
        op = _Int8Linear(product.weight, product.bias, reduce_range=product.logits,
                         unit_range=product.reads is Input.HIDDEN)
    elif precision == "bf16":
        op = _Bf16Linear(product.weight, product.bias)
    else:
        op = _Fp32Linear(product.weight, product.bias)
    return _Split(op, product.parts) if product.parts else op


@dataclass
class Products:
    """A decoder's step products in one precision, by the names its ``step_products()`` gave them.

    Attributes:
        precision: the precision they were made in.
        ops: name -> callable.
        signature: :func:`weights_signature` of the weights they were made from.
    """

    precision: str
    ops: dict[str, Callable] = field(default_factory=dict)
    signature: tuple = ()

    def __getitem__(self, name: str) -> Callable:
        return self.ops[name]


def make_products(declared: dict[str, Product], precision: str, signature: tuple = ()) -> Products:
    """Every declared product made in ``precision`` (no gradient, no autocast: packing is exact work).

    Args:
        declared: the decoder's ``step_products()``.
        precision: one of ``PRECISIONS``.
        signature: the weights' :func:`weights_signature`, kept to notice later changes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return Products(precision, {name: compute(p, precision) for name, p in declared.items()}, signature)


def weights_signature(params: Iterable[torch.Tensor]) -> tuple:
    """What identifies a model's weights now: each tensor's identity, storage, version counter, device and
    dtype, and the bits of every value of a 1-D tensor (biases) and of FINGERPRINT_SAMPLES values spread over
    each larger one. An optimiser step, ``load_state_dict`` (also with ``assign=True``), ``param.data = ...``,
    ``.to()`` or an in-place edit through ``.data`` (which PyTorch does not version) each change it; an edit
    of a weight matrix that spares every sampled value would not (after surgery that precise, save and load
    the model again).

    Args:
        params: the model's parameters.
    """
    params = list(params)
    # (an inference tensor, made under torch.inference_mode, has no version counter and cannot change in place)
    meta = tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version, p.device, p.dtype) for p in params)
    with torch.no_grad():  # biases and other 1-D tensors whole (a bias edit bans or favours one word), weights sampled
        samples = [p.detach().reshape(-1)[:: 1 if p.dim() < 2 else max(1, p.numel() // FINGERPRINT_SAMPLES)].float()
                   for p in params]
        bits = torch.cat(samples).view(torch.int32).cpu().numpy().tobytes() if samples else b""
    return meta + (bits,)


# -- which precision ---------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=1)
def _fp16_works() -> bool:
    try:
        _Fp16Linear(torch.ones(4, 4), torch.zeros(4))(torch.ones(1, 4))
        return True
    except Exception:  # no fbgemm (not x86), or a PyTorch without the op
        return False


@functools.lru_cache(maxsize=1)
def int8_works() -> bool:
    """True where PyTorch's dynamic int8 kernel runs on this CPU (an engine listed and usable)."""
    if not {"x86", "fbgemm", "onednn", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        return False
    try:
        _Int8Linear(torch.ones(4, 4), torch.zeros(4))(torch.ones(1, 4))
        return True
    except Exception:  # an engine listed but unusable, or a PyTorch without quantized ops
        return False


def supported_precisions(device: torch.device | str = "cpu") -> list[str]:
    """Precisions that run fast on ``device``: fp32 always; on a CPU also bf16 where it has bfloat16
    instructions and int8 where PyTorch's int8 kernel runs."""
    if torch.device(device).type != "cpu":
        return ["fp32"]
    return ["fp32"] + (["bf16"] if cpu_has_bf16() else []) + (["int8"] if int8_works() else [])


def auto_precision(device: torch.device | str = "cpu") -> str:
    """The precision ``auto`` picks, by a fixed rule (so one machine always gives the same captions): fp32 off
    the CPU; on a CPU int8 where it runs (the fastest everywhere we measured: a quarter of the bytes), else bf16
    where the CPU has bfloat16 instructions, else fp32.

    Args:
        device: where the decoder runs.
    """
    supported = supported_precisions(device)
    return "int8" if "int8" in supported else "bf16" if "bf16" in supported else "fp32"


def resolve_precision(requested: str | None, device: torch.device | str = "cpu") -> str:
    """The precision to run in: ``requested``, else ``$STORYTELLER_PRECISION``, else ``auto``
    (:func:`auto_precision`). A GPU runs fp32 whatever is asked (a warning says so when int8 or bf16 was).

    Args:
        requested: ``auto``, ``fp32``, ``bf16``, ``int8`` or None.
        device: where the decoder runs.

    Raises:
        ValueError: an unknown name (naming where it came from).
    """
    env = os.environ.get(ENV, "").strip()
    from_env = requested is None and bool(env)
    name = (requested or env or AUTO).strip().lower()
    if name == AUTO:
        return auto_precision(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be {AUTO}, {', '.join(PRECISIONS)}; got {name!r}"
                         + (f" (from ${ENV})" if from_env else ""))
    if torch.device(device).type != "cpu" and name != "fp32":
        warnings.warn(f"precision {name} is for CPUs; running fp32 on {device}", stacklevel=2)
        return "fp32"
    return name


def use_precision(model: torch.nn.Module, requested: str | None = None) -> str:
    """Set ``model.precision`` to :func:`resolve_precision` for the model's device; returns it.

    Args:
        model: a decoder (``HubDecoder``).
        requested: ``auto``, ``fp32``, ``bf16``, ``int8`` or None (then ``$STORYTELLER_PRECISION``, else auto).
    """
    model.precision = resolve_precision(requested, next(model.parameters()).device)
    return model.precision
