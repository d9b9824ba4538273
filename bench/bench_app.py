"""Benchmark the Gradio app: one photo alone (where the time goes) and many concurrent clients.

    python bench/bench_app.py [--model DIR|REPO|random] [--url URL] [--clients 16] [--requests 10]
                              [--single 20] [--beam 5] [--concurrency N] [--batch B] [--threads T]

1. **One photo alone, in process**: ``Captioner.caption`` (greedy + beam) on real photos one at a
   time; p50 / p95 of each stage — preprocessing (decode + resize + normalise), backbone, search
   (greedy and beam in one pass) — and of the total. Target: p50 < 250 ms end to end for efficientnet_lite0 on a 2-core CPU.
2. **One photo alone, over HTTP**: the same against the running app (adds upload, queue and JSON
   overhead), with each ``--client``: ``gradio`` (``gradio_client`` as made by default: it builds a TLS
   context for each of its three requests per call, about 40 ms each here, even for plain http, and polls
   what it has received every 50 ms), ``gradio-plain`` (the same client with ``ssl_verify=False``, which
   skips the TLS contexts; plain http only) and ``raw`` (Gradio's queue protocol spoken directly over
   httpx, as a browser does); ``page`` speaks the same protocol to the page's own first event
   (``caption_page``), whose answer is the captions: the time until they are on the screen (the attention
   view and "where they part" follow in a chained event the browser starts, not counted).
3. **Load**: ``--clients`` threads, each with its own client, send ``--requests`` captions each at
   once; every request must succeed; p50 / p95 latency and requests/s; once per ``--client``.
4. **Gradio's floor** (unless ``--no-floor``): the same one-photo requests to a Gradio app whose
   handler does nothing (same inputs, one text output): what upload, queue and transport cost here
   with no captioning at all, the baseline for (2).

Separate checks, each run alone (they replace 1-4):

- ``--soak N``: N requests from ``--clients`` clients (``--client``'s first kind), every 10th a file that is
  not an image: every photo must get captions and every bad file its one clear error (0 failures), and
  the server's memory (RSS, sampled every 0.5 s) must stay within 1.3x its size after warm-up (the first
  5% of the requests). The issue's soak: ``--soak 1000 --clients 8``.
- ``--startup R``: R times, the time ``python -c "import torch, gradio"`` takes, and the time from starting
  ``python app.py`` to its first caption (HTTP up, one request answered); the ratio of the medians
  (target: at most 1.6x).
- ``--against MODEL``: one photo over HTTP, ``--model``'s app against MODEL's, both running at once and asked
  in alternating order; their p50s and the ratio (a new default model against the one it replaces).
- ``--baseline ARGS``: load (``--clients`` x ``--requests``, ``--rounds`` times each, alternating) on this
  app.py with the given ``--concurrency``/``--batch``/``--threads`` against app.py with ARGS (e.g.
  ``--baseline "--batch 1 --concurrency 2"``, the settings before batching), or against another checkout's
  app.py (``--baseline-app PATH``, e.g. an earlier commit's, or ``bench/gradio_batch_app.py``: Gradio's own
  queue batching), both started first: throughput and p50 / p95 of each, and the ratios.
- ``--big-photo``: ``python -m storyteller caption`` on a 16320x12240 (200 MP) JPEG (made from an example
  photo), with its peak RSS (target: exit 0, at most 1.5 GB); on progressive JPEGs of 96 MP (captioned)
  and 200 MP (refused: its decoder would hold all 600 MB of its coefficients); on a 20000x20000 PNG
  (refused, exit 1).

Without ``--url`` the script starts ``app.py`` itself on 127.0.0.1 and a free port, and stops it at
the end. ``--model random`` (the default when there is no bundled model) writes a random decoder of
realistic size (3000 tokens, 512-d embeddings and LSTM) with the efficientnet_lite0 backbone: a
random decoder never emits ``<end>``, so every caption runs the full ``--max-len`` steps — a worst
case for decoding time. Photos: ../shared/data/flickr8k-fullres/validation if present, else examples/.

Example::

    python bench/bench_app.py --clients 16 --requests 10 --single 20
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FULLRES = REPO.parent / "shared" / "data" / "flickr8k-fullres" / "validation"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def photos(n: int) -> list[Path]:
    if (FULLRES / "metadata.jsonl").is_file():
        names = [json.loads(line)["file_name"] for line in (FULLRES / "metadata.jsonl").read_text().splitlines()]
        return [FULLRES / name for name in names[:n]]
    return sorted((REPO / "examples").glob("*.jpg"))[:n]


def random_model(folder: Path, vocab_size: int = 3000) -> Path:
    """A random decoder of realistic size with the efficientnet_lite0 backbone spec."""
    import torch

    from storyteller.backbones import backbone_spec
    from storyteller.decoders import ShowAndTell
    from storyteller.vocab import Vocabulary

    spec = backbone_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = ShowAndTell(vocab_size=vocab_size, feature_dim=spec["feature_dim"], embed_dim=512, hidden_dim=512,
                        backbone=spec, extra={"dataset": "random weights (benchmark)"})
    model.vocab = Vocabulary([f"w{i}" for i in range(vocab_size - 4)])
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, concurrency: int | None, threads: int | None, log: Path, extra: Sequence[str] = (),
              app: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``app`` (default: this checkout's app.py) serving ``model``; ``extra``: more app.py arguments."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = (app or REPO / "app.py").resolve()
    args = [sys.executable, str(app), "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if threads:
        args += ["--threads", str(threads)]
    return _serve(args + list(extra), url, log, "app.py", cwd=app.parent)


def _serve(args: list[str], url: str, log: Path, name: str, cwd: Path = REPO) -> tuple[subprocess.Popen, str]:
    """Start a Gradio server process and wait until ``url`` answers."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{name} did not start within 180 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


# Gradio's own cost of a request: the app's request path (upload, queue, result stream) to a handler that
# does nothing, with the app's inputs (a photo with preprocess=False, three numbers) and one text output.
FLOOR_APP = """import sys
import gradio as gr
with gr.Blocks(analytics_enabled=False) as demo:
    inputs = [gr.Image(type="filepath"), gr.Number(), gr.Number(), gr.Number()]
    gr.Button().click(lambda *a: "ok", inputs=inputs, outputs=gr.Textbox(), api_name="caption", preprocess=False)
demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""


def bench_floor(paths: list[Path], n: int, beam: int, max_len: int, tmp: Path, kinds: list[str]) -> None:
    (tmp / "floor_app.py").write_text(FLOOR_APP)
    port = free_port()
    proc, url = _serve([sys.executable, str(tmp / "floor_app.py"), str(port)], f"http://127.0.0.1:{port}/",
                       tmp / "floor.log", "the floor app")
    try:
        print(f"\n== Gradio's floor: the same request to a handler that does nothing ({n} runs) ==")
        for kind in kinds:
            client = CLIENTS[kind](url)
            client.caption(paths[0], beam, max_len)  # warm
            lat = []
            for i in range(n):
                t = time.perf_counter()
                client.caption(paths[i % len(paths)], beam, max_len)
                lat.append((time.perf_counter() - t) * 1e3)
            print(f"  {client.name:<14} p50 {statistics.median(lat):7.1f} ms   p95 {pct(lat, 95):7.1f} ms")
    finally:
        _stop(proc)


def bench_in_process(model: str, paths: list[Path], n: int, beam: int, max_len: int) -> None:
    from storyteller.captioner import load

    cap = load(model)
    cap.warmup()
    stages: dict[str, list[float]] = {k: [] for k in ("preprocess", "backbone", "search", "total")}
    for i in range(n):
        r = cap.caption([paths[i % len(paths)]], beam_size=beam, max_len=max_len)[0]
        for k in stages:
            stages[k].append(r.timings_ms[k])
    p50_total = statistics.median(stages["total"])
    print(f"\n== one photo alone, in process ({n} runs, greedy + beam {beam}, max_len {max_len}, "
          f"backbone {cap.info['backbone']}, torch threads {__import__('torch').get_num_threads()}) ==")
    for k, v in stages.items():
        share = "" if k == "total" else f"  {100 * statistics.median(v) / p50_total:4.0f}% of p50 total"
        print(f"  {k:<10} p50 {statistics.median(v):7.1f} ms   p95 {pct(v, 95):7.1f} ms{share}")
    print(f"  target p50 < 250 ms end to end: {'met' if p50_total < 250 else 'NOT met'}")


class GradioClient:
    """``gradio_client.Client`` calling ``/caption``, as a user would make it. Two costs of its own, measured
    on this 2-core CPU with gradio_client 2.7: it sends the upload, the queue join and the event stream of
    every call each with a new ``httpx`` client, and each of those builds a TLS context from the CA bundle
    (about 40 ms each here), even for a plain-http URL; and it looks at the messages it has received only
    every 50 ms."""

    name = "gradio_client"
    verify = True

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False, ssl_verify=self.verify)

    def caption(self, path: Path, beam: int, max_len: int) -> list:
        from gradio_client import handle_file

        return list(self.client.predict(handle_file(str(path)), beam, max_len, 0.0, api_name="/caption"))


class PlainGradioClient(GradioClient):
    """The same ``gradio_client.Client`` with ``ssl_verify=False``, for a plain-http URL only (there is no
    certificate to verify): its requests skip the TLS context, and what is left is the app, Gradio's
    protocol and the client's 50 ms polling."""

    name = "gradio_client, ssl_verify=False"
    verify = False

    def __init__(self, url: str):
        if not url.startswith("http://"):
            raise SystemExit(f"--client gradio-plain is for a plain-http URL, got {url}")
        super().__init__(url)


class RawClient:
    """The same call in Gradio's own HTTP protocol (what the browser speaks), with httpx: upload the photo,
    join the queue, read the event stream until the result. No polling: the floor of a request here."""

    name = "raw HTTP"
    api_name = "caption"

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(timeout=120)
        config = self.http.get(url.rstrip("/") + "/config").json()
        self.prefix = url.rstrip("/") + "/" + config.get("api_prefix", "/gradio_api").strip("/") + "/"
        self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == self.api_name)

    def caption(self, path: Path, beam: int, max_len: int) -> list:
        import uuid

        with open(path, "rb") as f:
            r = self.http.post(self.prefix + "upload", files=[("files", (path.name, f))])
        r.raise_for_status()
        photo = {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        session = uuid.uuid4().hex
        r = self.http.post(self.prefix + "queue/join",
                           json={"data": [photo, beam, max_len, 0.0], "fn_index": self.fn_index, "session_hash": session})
        r.raise_for_status()
        with self.http.stream("GET", self.prefix + "queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed":
                    if not msg.get("success"):
                        raise RuntimeError(f"the app failed: {msg.get('output')}")
                    data = msg["output"]["data"]
                    if isinstance(data[0], str) and data[0].strip():
                        return data
                    raise RuntimeError(f"the app answered without captions: {str(msg.get('output'))[:300]}")
        raise RuntimeError("the event stream ended without a result")


class PageClient(RawClient):
    """What the page's own event costs until the captions are on the screen: the browser's protocol (as
    :class:`RawClient`) on the page's first event (``caption_page``: clear, then the captions); the attention
    view and "where they part" follow in a chained event the browser starts afterwards, not counted here. An
    app without that event (before 2026-12-07) is asked through ``/caption``, which is what its page waited for."""

    name = "raw HTTP, the page's first event"
    api_name = "caption_page"

    def __init__(self, url: str):
        try:
            super().__init__(url)
        except StopIteration:  # an older app: its page event returned everything at once, as /caption does
            self.api_name = "caption"
            super().__init__(url)


CLIENTS = {"gradio": GradioClient, "gradio-plain": PlainGradioClient, "raw": RawClient, "page": PageClient}


def bench_http_single(url: str, paths: list[Path], n: int, beam: int, max_len: int, kind: str) -> None:
    client = CLIENTS[kind](url)
    client.caption(paths[0], beam, max_len)  # warm
    lat, server = [], []
    for i in range(n):
        t = time.perf_counter()
        out = client.caption(paths[i % len(paths)], beam, max_len)
        lat.append((time.perf_counter() - t) * 1e3)
        server.append(float(out[7]["timings_ms"]["total"]))  # the result JSON (app.API_OUTPUTS)
    print(f"\n== one photo alone, over HTTP via {client.name} ({n} runs) ==")
    print(f"  end to end  p50 {statistics.median(lat):7.1f} ms   p95 {pct(lat, 95):7.1f} ms")
    print(f"  of which captioning in the app p50 {statistics.median(server):7.1f} ms; "
          f"upload + queue + transport p50 {statistics.median(lat) - statistics.median(server):7.1f} ms")


def bench_against(model: str, other: str, paths: list[Path], n: int, beam: int, max_len: int, kind: str,
                  tmp: Path) -> float:
    """One photo over HTTP, ``model``'s app against ``other``'s, both running at once and asked in alternating
    order (each photo to both, the first one switching), so load on the machine falls on both alike.
    Returns the ratio of the p50s (``model`` / ``other``)."""
    procs = [start_app(m, None, None, tmp / f"against-{i}.log") for i, m in enumerate((model, other))]
    try:
        clients = [CLIENTS[kind](url) for _, url in procs]
        for c in clients:
            c.caption(paths[0], beam, max_len)  # warm
        lat: list[list[float]] = [[], []]
        for i in range(n):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                clients[j].caption(paths[i % len(paths)], beam, max_len)
                lat[j].append((time.perf_counter() - t) * 1e3)
    finally:
        for proc, _ in procs:
            _stop(proc)
    p50 = [statistics.median(x) for x in lat]
    print(f"\n== one photo over HTTP via {clients[0].name}, two apps at once, alternating ({n} photos each) ==")
    print(f"  {model}: p50 {p50[0]:7.1f} ms   p95 {pct(lat[0], 95):7.1f} ms")
    print(f"  {other}: p50 {p50[1]:7.1f} ms   p95 {pct(lat[1], 95):7.1f} ms")
    print(f"  ratio {p50[0] / p50[1]:.2f}x")
    return p50[0] / p50[1]


def run_load(url: str, paths: list[Path], clients: int, requests: int, beam: int, max_len: int, kind: str
             ) -> tuple[list[float], list[str], float]:
    """``clients`` threads, each with its own client, send ``requests`` photos each at once.
    Returns every request's latency (ms), the errors, and the wall time (s)."""
    pool = [CLIENTS[kind](url) for _ in range(clients)]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(ci: int) -> None:
        start.wait()
        for j in range(requests):
            path = paths[(ci * requests + j) % len(paths)]
            t = time.perf_counter()
            try:
                out = pool[ci].caption(path, beam, max_len)
                ok = bool(out[0].strip() and out[2].strip())  # greedy and beam captions
                err = None if ok else f"empty caption for {path.name}"
            except Exception as e:  # any failure counts
                err = f"{type(e).__name__}: {e}"
            with lock:
                lat.append((time.perf_counter() - t) * 1e3)
                if err:
                    errors.append(err)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    return lat, errors, time.perf_counter() - t0


def bench_load(url: str, paths: list[Path], clients: int, requests: int, beam: int, max_len: int, kind: str) -> bool:
    lat, errors, wall = run_load(url, paths, clients, requests, beam, max_len, kind)
    total = clients * requests
    print(f"\n== load: {clients} concurrent {CLIENTS[kind].name} clients x {requests} requests = {total} "
          f"(beam {beam}, max_len {max_len}) ==")
    print(f"  succeeded {total - len(errors)}/{total}" + (f"; first error: {errors[0]}" if errors else ""))
    print(f"  latency p50 {statistics.median(lat):7.0f} ms   p95 {pct(lat, 95):7.0f} ms   max {max(lat):7.0f} ms")
    print(f"  throughput {total / wall:5.2f} requests/s  ({wall:.1f} s wall)")
    return not errors


def bench_against_settings(model: str, new_args: list[str], old_args: list[str], old_app: Path | None,
                           paths: list[Path], clients: int, requests: int, rounds: int, beam: int, max_len: int,
                           kind: str, tmp: Path) -> bool:
    """Load on two apps in one run: this app.py with ``new_args`` against ``old_app`` (default: the same app.py)
    with ``old_args``, both started first and loaded in turn, ``rounds`` times (old, new, old, new...), so drift in
    the machine's load falls on both. Prints each one's throughput and p50 / p95; True when every request succeeded."""
    sides = {"old": (old_app, old_args), "new": (None, new_args)}
    procs = {k: start_app(model, None, None, tmp / f"settings-{k}.log", extra=a, app=app) for k, (app, a) in sides.items()}
    stats = {k: {"lat": [], "errors": [], "wall": 0.0} for k in sides}
    try:
        for url in (u for _, u in procs.values()):  # warm both
            run_load(url, paths, 2, 2, beam, max_len, kind)
        for _ in range(rounds):
            for k in sides:
                lat, errors, wall = run_load(procs[k][1], paths, clients, requests, beam, max_len, kind)
                stats[k]["lat"] += lat
                stats[k]["errors"] += errors
                stats[k]["wall"] += wall
    finally:
        for proc, _ in procs.values():
            _stop(proc)
    print(f"\n== load, two settings in one run: {clients} concurrent {CLIENTS[kind].name} clients x {requests} "
          f"requests, {rounds} rounds each, alternating (beam {beam}, max_len {max_len}) ==")
    rate = {}
    for k, (app, a) in sides.items():
        st, n = stats[k], len(stats[k]["lat"])
        rate[k] = n / st["wall"]
        print(f"  {k}: {app or 'app.py'} {' '.join(a) or '(defaults)'}: succeeded {n - len(st['errors'])}/{n}; "
              f"{rate[k]:5.2f} requests/s; latency p50 {statistics.median(st['lat']):6.0f} ms  p95 {pct(st['lat'], 95):6.0f} ms"
              + (f"; first error: {st['errors'][0]}" if st["errors"] else ""))
    print(f"  throughput new / old: {rate['new'] / rate['old']:.2f}x; p95 new / old: "
          f"{pct(stats['new']['lat'], 95) / pct(stats['old']['lat'], 95):.2f}x")
    return not stats["old"]["errors"] and not stats["new"]["errors"]


def rss_mb(pid: int) -> float:
    """A process's resident memory (MB) from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_soak(url: str, pid: int, paths: list[Path], clients: int, total: int, beam: int, max_len: int, kind: str,
               tmp: Path, bad_every: int = 10, limit: float = 1.3) -> bool:
    """``total`` requests from ``clients`` clients, every ``bad_every``-th a file that is not an image."""
    bad = tmp / "not_an_image.jpg"
    bad.write_bytes(b"this is a text file pretending to be a JPEG\n" * 20)
    pool = [CLIENTS[kind](url) for _ in range(clients)]
    counter, lock, failures = iter(range(total)), threading.Lock(), []
    warm_at, rss = max(1, total // 20), {"warm": None, "peak": 0.0, "samples": []}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            mb = rss_mb(pid)
            rss["samples"].append(mb)
            rss["peak"] = max(rss["peak"], mb) if rss["warm"] is not None else rss["peak"]
            done.wait(0.5)

    def worker(ci: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
                if i == warm_at and rss["warm"] is None:
                    rss["warm"] = rss_mb(pid)
            if i is None:
                return
            is_bad = i % bad_every == bad_every - 1
            try:
                out = pool[ci].caption(bad if is_bad else paths[i % len(paths)], beam, max_len)
                err = "a bad file was captioned" if is_bad else (None if out[0].strip() and out[2].strip() else "empty caption")
            except Exception as e:  # the bad file's error is the expected outcome
                err = None if is_bad and "not an image" in str(e) else f"{type(e).__name__}: {e}"
            if err:
                with lock:
                    failures.append(err)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    done.set()
    end = rss_mb(pid)
    warm = rss["warm"] or end
    print(f"\n== soak: {total} requests from {clients} {pool[0].name} clients, every {bad_every}th not an image "
          f"(beam {beam}, max_len {max_len}) ==")
    print(f"  failures {len(failures)}" + (f"; first: {failures[0]}" if failures else "") + f"; {wall:.0f} s wall, "
          f"{total / wall:.2f} requests/s")
    print(f"  server RSS after warm-up ({warm_at} requests) {warm:.0f} MB, peak after {rss['peak']:.0f} MB "
          f"({rss['peak'] / warm:.2f}x), at the end {end:.0f} MB ({end / warm:.2f}x); target <= {limit}x")
    tenths = [rss["samples"][min(len(rss["samples"]) - 1, k * len(rss["samples"]) // 10)] for k in range(1, 11)]
    print("  server RSS at each tenth of the run (MB): " + " ".join(f"{mb:.0f}" for mb in tenths))
    return not failures and rss["peak"] <= limit * warm


def bench_startup(model: str, repeats: int, tmp: Path) -> bool:
    """The first caption after `python app.py`, against the time to import torch and gradio."""
    imports, firsts, ups = [], [], []
    photo = photos(1)[0]
    for r in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, gradio"], check=True, cwd=REPO)
        imports.append(time.perf_counter() - t)
        t = time.perf_counter()
        proc, url = start_app(model, None, None, tmp / f"startup-{r}.log")
        ups.append(time.perf_counter() - t)
        try:
            RawClient(url).caption(photo, 3, 20)
            firsts.append(time.perf_counter() - t)
        finally:
            _stop(proc)
    ratio = statistics.median(firsts) / statistics.median(imports)
    print(f"\n== start-up ({repeats} runs, model {model}) ==")
    print(f"  import torch, gradio: median {statistics.median(imports):.2f} s ({', '.join(f'{x:.2f}' for x in imports)})")
    print(f"  python app.py to its first caption: median {statistics.median(firsts):.2f} s "
          f"({', '.join(f'{x:.2f}' for x in firsts)}); of which HTTP up median {statistics.median(ups):.2f} s")
    print(f"  ratio {ratio:.2f}x; target <= 1.6x: {'met' if ratio <= 1.6 else 'NOT met'}")
    return ratio <= 1.6


MAKE_BIG_PHOTO = """import sys
from PIL import Image
big = Image.open(sys.argv[1]).convert("RGB").resize((16320, 12240), Image.BICUBIC)
big.save(sys.argv[2], quality=90)
big.save(sys.argv[3], quality=90, progressive=True)
big.resize((11312, 8484), Image.BILINEAR).save(sys.argv[4], quality=90, progressive=True)
Image.new("1", (20000, 20000)).save(sys.argv[5], optimize=True)
"""
# Runs a command and prints the peak RSS (KiB) of its process tree: RUSAGE_CHILDREN of this wrapper only.
PEAK_RSS = "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; " \
           "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'exit', rc)"


def bench_big_photo(model: str, tmp: Path, limit_gb: float = 1.5) -> bool:
    """``python -m storyteller caption`` on a 200 MP baseline JPEG (captioned), progressive JPEGs of 96 MP
    (captioned) and 200 MP (refused: its decoder would hold 600 MB of coefficients) and a 400 MP PNG (refused)."""
    files = [tmp / "200mp.jpg", tmp / "200mp-progressive.jpg", tmp / "96mp-progressive.jpg", tmp / "20000x20000.png"]
    source = sorted((REPO / "examples").glob("*.jpg"))[1]
    subprocess.run([sys.executable, "-c", MAKE_BIG_PHOTO, str(source), *map(str, files)], check=True)
    print(f"\n== big photos: python -m storyteller caption --model {model} (peak RSS of the whole command) ==")
    ok = True
    for f, want in zip(files, (0, 1, 0, 1)):
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "storyteller", "caption",
                              "--model", model, str(f)], capture_output=True, text=True, cwd=REPO)
        last = run.stdout.strip().splitlines()[-1].split()
        peak_gb, rc = int(last[1]) * 1024 / 1e9, int(last[3])
        said = (run.stdout.strip().splitlines()[:-1] or [""])[0] + run.stderr.strip()
        print(f"  {f.name} ({f.stat().st_size / 1e6:.1f} MB): exit {rc}, peak RSS {peak_gb:.2f} GB; {said[:160]}")
        ok = ok and rc == want and peak_gb <= limit_gb
    print(f"  target: the 200 MP baseline and 96 MP progressive JPEGs captioned (exit 0), the 200 MP progressive "
          f"JPEG and the PNG refused (exit 1), each at <= {limit_gb} GB: {'met' if ok else 'NOT met'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or Hub id, or 'random' (default: bundled, else random)")
    p.add_argument("--url", default=None, help="an app already running (default: start app.py here)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--single", type=int, default=20, help="runs for the one-photo latency")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=None, help="app.py --concurrency (default: the app's)")
    p.add_argument("--client", nargs="+", choices=sorted(CLIENTS), default=None,
                   help="HTTP clients to measure with: gradio (gradio_client as made by default), gradio-plain "
                        "(gradio_client with ssl_verify=False, plain http only) and raw (Gradio's protocol over "
                        "httpx); default: all three, gradio-plain left out for an https --url")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip Gradio's floor (the same request to a do-nothing handler)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the in-process run and app.py --threads (default: the app's rule, CPUs/concurrency)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="only the soak: N requests from --clients clients, every 10th not an image")
    p.add_argument("--startup", type=int, default=0, metavar="R", help="only the start-up check, R runs")
    p.add_argument("--against", default=None, metavar="MODEL",
                   help="only one photo over HTTP, --model's app against MODEL's, both at once (--single photos each)")
    p.add_argument("--big-photo", action="store_true", help="only the 200 MP photo check (CLI peak memory)")
    p.add_argument("--batch", type=int, default=None, help="app.py --batch (default: the app's)")
    p.add_argument("--baseline", default=None, metavar="ARGS",
                   help="only load on two settings in one run: app.py with --concurrency/--batch/--threads as given "
                        "against app.py with ARGS (e.g. '--batch 1 --concurrency 2', the settings before batching)")
    p.add_argument("--baseline-app", type=Path, default=None,
                   help="with --baseline: another checkout's app.py for the old side (e.g. an earlier commit's)")
    p.add_argument("--rounds", type=int, default=2, help="with --baseline: load rounds per side")
    args = p.parse_args(argv)
    soak_client = (args.client or ["raw"])[0]  # the soak's clients: raw unless asked (they share the CPU with the app)
    if args.client is None:
        args.client = ["gradio", "raw"] if (args.url or "").startswith("https://") else ["gradio", "gradio-plain", "raw"]

    from storyteller.captioner import DEFAULT_MODEL_DIR

    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    model = args.model or (str(DEFAULT_MODEL_DIR) if DEFAULT_MODEL_DIR.is_dir() else "random")
    if model == "random":
        model = str(random_model(tmp / "random-lite0"))
    paths = photos(32)
    print(f"model {model}; {len(paths)} photos from {paths[0].parent}; {os.cpu_count()} CPUs")
    if args.big_photo:
        return 0 if bench_big_photo(model, tmp) else 1
    if args.startup:
        return 0 if bench_startup(model, args.startup, tmp) else 1
    if args.baseline is not None:
        new = [a for k, v in (("--concurrency", args.concurrency), ("--batch", args.batch), ("--threads", args.threads))
               if v for a in (k, str(v))]
        ok = bench_against_settings(model, new, args.baseline.split(), args.baseline_app, paths, args.clients,
                                    args.requests, args.rounds, args.beam, args.max_len, soak_client, tmp)
        return 0 if ok else 1
    if args.against:
        bench_against(model, args.against, paths, args.single, args.beam, args.max_len, soak_client, tmp)
        return 0
    extra = ["--batch", str(args.batch)] if args.batch else []
    if args.soak:
        proc, url = start_app(model, args.concurrency, args.threads, tmp / "app.log", extra=extra)
        try:
            ok = bench_soak(url, proc.pid, paths, args.clients, args.soak, args.beam, args.max_len,
                            soak_client, tmp)
        finally:
            _stop(proc)
        return 0 if ok else 1

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or max(1, cpus // (args.concurrency or 2)))
    bench_in_process(model, paths, args.single, args.beam, args.max_len)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_app(model, args.concurrency, args.threads, tmp / "app.log", extra=extra)
        print(f"\nstarted app.py at {url} (concurrency {args.concurrency or 'default'}, threads {args.threads or 'default'})")
    ok = True
    try:
        for kind in args.client:
            bench_http_single(url, paths, args.single, args.beam, args.max_len, kind)
        for kind in args.client:
            ok = bench_load(url, paths, args.clients, args.requests, args.beam, args.max_len, kind) and ok
    finally:
        if proc is not None:
            _stop(proc)
    if args.floor:
        bench_floor(paths, args.single, args.beam, args.max_len, tmp, args.client)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
