"""Every shipped model gives the example photos the captions pinned in tests/golden_captions.json, in fp32 and
int8: a refactor of the decoders, the searches or the precision code that changes a caption fails here
(the card figures' tolerance would not notice three captions changing out of five).

    python tests/test_golden_captions.py --write     # re-pin, only when a model or its decoding changes on purpose
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden_captions.json"
PHOTOS = sorted((REPO / "examples").glob("*.jpg"))
LOG_PROB_TOLERANCE = 2e-3  # float rounding of the backbone and the products differs a little between CPUs


def pin_name(precision: str) -> str:
    """The key of this CPU's pins. fp32 agrees across CPUs within LOG_PROB_TOLERANCE; int8 does not: FBGEMM's
    AVX2 kernels round int8 products differently from its AVX-512 ones (an n-best caption and log-probabilities
    0.03 apart, measured 2026-12-02), so AVX2-only CPUs have int8 pins of their own ("int8@avx2")."""
    import torch

    avx2_only = torch.backends.cpu.get_cpu_capability() == "AVX2"  # the ISA PyTorch's kernels dispatch on
    return "int8@avx2" if precision == "int8" and avx2_only else precision


PIN_THREADS = 1  # the app's setting; see caption_examples


def caption_examples(model: str, precision: str) -> dict[str, dict]:
    """The pinned fields of every example photo's captions by ``model`` in ``precision``, at ``PIN_THREADS`` torch
    threads: the backbone's convolutions round by how the work is split between threads (features 2.4e-5 apart
    between 1 and 2 threads, measured 2026-12-07), which an int8 attention step magnifies to 3e-3 in a
    log-probability; the decoder itself gives the same numbers at any thread count and batch size."""
    import torch

    from storyteller.captioner import load

    captioner = load(str(REPO / model), precision=precision)
    threads = torch.get_num_threads()
    torch.set_num_threads(PIN_THREADS)
    try:
        results = captioner.caption([str(p) for p in PHOTOS], n_best=captioner.decoding["beam_size"])
    finally:
        torch.set_num_threads(threads)
    return {p.name: {"greedy": r.greedy.text, "greedy_log_prob": round(r.greedy.log_prob, 5),
                     "beam": [c.text for c in r.beam], "beam_log_prob": [round(c.log_prob, 5) for c in r.beam]}
            for p, r in zip(PHOTOS, results)}


def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["models"]


CASES = [(m, p) for m, by_precision in golden().items() for p in by_precision if "@" not in p]


@pytest.mark.parametrize("model,precision", CASES, ids=[f"{m.split('/')[-1]}-{p}" for m, p in CASES])
def test_shipped_models_caption_the_examples_as_pinned(model, precision):
    from storyteller.precision import supported_precisions

    if precision != "fp32" and precision not in supported_precisions():
        pytest.skip(f"no {precision} kernel on this CPU")
    from storyteller.decoders import local_weight_files

    if not local_weight_files(REPO / model):
        pytest.fail(f"{model} is pinned but not shipped: re-pin with `python tests/test_golden_captions.py --write`")
    pins, name = golden()[model], pin_name(precision)
    if name not in pins:
        pytest.fail(f"{model} has no {name} pins for this CPU: pin them with `python tests/test_golden_captions.py --write`")
    want, got = pins[name], caption_examples(model, precision)
    assert sorted(got) == sorted(want), "the example photos changed: re-pin"
    for photo, w in want.items():
        g = got[photo]
        assert (g["greedy"], g["beam"]) == (w["greedy"], w["beam"]), photo
        assert g["greedy_log_prob"] == pytest.approx(w["greedy_log_prob"], abs=LOG_PROB_TOLERANCE), photo
        assert g["beam_log_prob"] == pytest.approx(w["beam_log_prob"], abs=LOG_PROB_TOLERANCE), photo


def write(models: list[str]) -> None:
    """Pin ``models`` (paths relative to the repository) in fp32 and int8, the int8 under this CPU's key (the
    other CPU class's int8 pins stay)."""
    data = json.loads(GOLDEN.read_text(encoding="utf-8")) if GOLDEN.is_file() else {"about": "", "models": {}}
    for model in models:
        pins = data["models"].setdefault(model, {})
        pins.update({pin_name(p): caption_examples(model, p) for p in ("fp32", "int8")})
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden_captions.py --write [MODEL...]  (default: every shipped model)")
    sys.path.insert(0, str(REPO))
    names = [a for a in sys.argv[1:] if a != "--write"]
    write(names or sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "models").glob("*/config.json")))
