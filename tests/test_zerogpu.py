"""app.py on ZeroGPU: with a stand-in ``spaces`` module (injected into sys.modules), the function decorated with
``@spaces.GPU`` is what the page's and the API's events call, straight from the request (no batch worker: ZeroGPU
bills each visitor's own request); without ``spaces`` nothing changes (the CPU path)."""
from __future__ import annotations

import importlib
import sys
import types

import pytest

from tests.helpers_models import save_test_model
from tests.helpers_server import REPO

EXAMPLE = sorted((REPO / "examples").glob("*.jpg"))[0]


def fresh_app(monkeypatch, model_dir, spaces_module=None, zero_gpu: bool = False):
    import torch

    monkeypatch.setenv("STORYTELLER_MODEL", str(model_dir))
    if zero_gpu:
        monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    else:
        monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    if spaces_module is not None:
        monkeypatch.setitem(sys.modules, "spaces", spaces_module)
    else:
        monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError: not installed
    threads = torch.get_num_threads()
    monkeypatch.delitem(sys.modules, "app", raising=False)
    try:
        return importlib.import_module("app")
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("app", None)


def stand_in_spaces():
    """A ``spaces`` module whose GPU(duration=...) wraps a function and records every call of the wrapper."""
    calls: list[str] = []
    mod = types.ModuleType("spaces")

    def GPU(fn=None, duration=60):
        def wrap(f):
            def gpu_wrapper(*args, **kwargs):
                calls.append(f.__name__)
                mod.durations.append(duration(*args, **kwargs) if callable(duration) else duration)
                return f(*args, **kwargs)
            gpu_wrapper.__wrapped__ = f
            return gpu_wrapper
        return wrap(fn) if fn is not None else wrap

    mod.GPU, mod.calls, mod.durations = GPU, calls, []
    return mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("zerogpu") / "tiny-lite0")


def page_and_api(app):
    fns = {f.api_name: f.fn for f in app.demo.fns.values() if f.api_name}
    photo = {"path": str(EXAMPLE), "url": None}
    steps = list(fns["caption_page"](photo, 2, 6, 0.0))
    assert steps[-1][0].strip()  # the greedy caption
    assert fns["caption_json"](photo, 2, 6, 0.0)["beam"]["text"].strip()


def test_on_zerogpu_the_events_call_the_gpu_decorated_function(monkeypatch, model_dir):
    spaces = stand_in_spaces()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    # the model would go to CUDA on ZeroGPU; here (no GPU) the stand-in loads it on the CPU
    import storyteller.captioner as cap
    real_load = cap.load
    monkeypatch.setattr(cap, "load", lambda *a, **k: real_load(*a, **{**k, "device": "cpu"}))
    app = fresh_app(monkeypatch, model_dir, spaces, zero_gpu=True)
    assert app.ZERO_GPU and app.caption_on_device.__wrapped__.__name__ == "caption_on_device"
    page_and_api(app)
    assert spaces.calls == ["caption_on_device"] * 2  # the page's event and the API's, each through the GPU function
    assert spaces.durations == [app.GPU_DURATION_S] * 2


def test_with_spaces_but_off_zerogpu_the_batch_worker_calls_the_decorated_function(monkeypatch, model_dir):
    spaces = stand_in_spaces()
    app = fresh_app(monkeypatch, model_dir, spaces, zero_gpu=False)
    assert not app.ZERO_GPU
    page_and_api(app)
    assert spaces.calls == ["caption_on_device"] * 2


def test_without_spaces_the_cpu_path_is_untouched(monkeypatch, model_dir):
    from storyteller.serving import caption_batch

    app = fresh_app(monkeypatch, model_dir, None)
    assert app.spaces is None and not app.ZERO_GPU
    assert not hasattr(app.caption_on_device, "__wrapped__")  # the plain function, no decorator
    assert app.captioner.device.type == "cpu"
    page_and_api(app)
    assert app.caption_batch is caption_batch
