"""app.py's ``/caption`` with Gradio's own queue batching instead of the app's batch worker, for
``bench/bench_app.py --baseline-app bench/gradio_batch_app.py``: which serves more visitors on 2 cores.

    python bench/gradio_batch_app.py --model M [--host H] [--port P] [--batch 8]

The event is registered with ``batch=True, max_batch_size=--batch`` (one worker: Gradio hands it the waiting
requests as lists); the handler decodes the photos, captions them in one ``storyteller.serving.caption_batch``
call per decoding setting and renders each as app.py does. Only ``/caption`` (what the load benchmark asks);
no page, and one bad file fails its whole batch (Gradio batches have one outcome).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    sys.argv = [sys.argv[0], "--model", args.model, "--batch", "1", "--threads", "0"]
    import gradio as gr
    import torch

    import app
    from storyteller.serving import caption_batch

    torch.set_num_threads(app.CPUS)
    captioner = app.captioner
    names = tuple(n for n in app.API_OUTPUTS if n != "attention" or captioner.has_attention)

    def caption_many(images: list, beams: list, lens: list, alphas: list) -> list[list]:
        jobs = []
        for image, k, n, a in zip(images, beams, lens, alphas):
            k, n = int(float(k)), int(float(n))
            photo = captioner.load_image(app.image_source(image))
            jobs.append(((k, n, float(a)), photo))
        done: dict[int, tuple] = {}
        for key in dict.fromkeys(j[0] for j in jobs):
            idx = [i for i, j in enumerate(jobs) if j[0] == key]
            out = caption_batch(captioner, [jobs[i][1] for i in idx], *key, [None] * len(idx),
                                [app.image_warnings(jobs[i][1]) for i in idx])
            done.update(zip(idx, out))
        cols: list[list] = [[] for _ in names]
        for i, ((k, n, a), photo) in enumerate(jobs):
            result, scored, features = done[i]
            values = app.page_values(captioner, app.Captioned(photo, result, scored, k, n, a, features), names)
            for col, name in zip(cols, names):
                col.append(values[name])
        return cols

    with gr.Blocks() as demo:
        inputs = [gr.Image(type="filepath"), gr.Number(3), gr.Number(20), gr.Number(0.0)]
        outputs = [gr.JSON() if n == "result" else gr.HTML() if n == "attention" else gr.Textbox() for n in names]
        gr.Button().click(caption_many, inputs, outputs, api_name="caption", batch=True, max_batch_size=args.batch,
                          preprocess=False, concurrency_limit=1)
    demo.queue(max_size=app.QUEUE_SIZE).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
