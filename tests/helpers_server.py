"""Start ``app.py`` in a subprocess on 127.0.0.1 and a free port, wait (bounded) until it answers, stop it.

    with running_app(model_dir) as url:
        Client(url).predict(...)
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_app(model_dir: Path | None, log_path: Path, startup_timeout: float = 180.0,
                extra_args: tuple[str, ...] = (), app_dir: Path = REPO) -> Iterator[str]:
    """Run ``python app.py --model model_dir`` until the block ends; yields its URL.

    Args:
        model_dir: the model folder to serve (None: the app's default, the bundled folder).
        log_path: where the server's stdout/stderr go (shown if start-up fails).
        startup_timeout: seconds to wait for the first HTTP 200.
        extra_args: more ``app.py`` arguments.
        app_dir: the folder holding ``app.py`` (e.g. a staged Space); it runs from there.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("STORYTELLER_MODEL", None)
    if app_dir != REPO:  # a staged Space must run on its own copy of the package, not the checkout's
        env["PYTHONPATH"] = str(app_dir)
    model_args = ["--model", str(model_dir)] if model_dir is not None else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(app_dir / "app.py"), *model_args, "--host", "127.0.0.1",
                                 "--port", str(port), *extra_args], cwd=app_dir, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {startup_timeout:.0f}s:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
