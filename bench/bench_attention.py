"""What attention costs at caption time: one decoder step and one photo, pooled model against attention model.

    python -m bench.bench_attention --pooled models/flickr8k-lite0-scst --attention runs/f8k-att/model --threads 1

Both models run in the same process on the same photos (examples/ by default), interleaved, so the
ratio is measured under the same load. Prints a table and one JSON line:
- one decoder step for one image (after ``init_state``), median of many;
- one photo through ``Captioner.caption`` (greedy + beam at the model's default width; decode,
  preprocessing, backbone and both searches), p50 over the photos x repeats;
- for the attention model also the per-word attention figure (``attention_figure``) the CLI draws.
Without ``--attention`` a random-weight attention decoder of the usual size (512/512/512) is used,
with the pooled model's backbone and vocabulary: its captions are word salad of max length, so the
per-photo figure is then an upper bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storyteller.decoders import ShowAttendTell  # noqa: E402
from storyteller.captioner import load  # noqa: E402
from bench.timing import time_step  # noqa: E402
from storyteller.vocab import Vocabulary  # noqa: E402


def step_ms(captioner, repeats: int = 200) -> float:
    """Median ms of one decoder step for one image (``bench.timing.time_step``)."""
    return time_step(captioner.model, captioner.features([Image_blank()]), repeats=repeats)


def Image_blank():
    from PIL import Image

    return Image.new("RGB", (320, 240), (120, 130, 140))


def random_attention_model(pooled_dir: Path, out: Path) -> Path:
    config = json.loads((pooled_dir / "config.json").read_text(encoding="utf-8"))
    vocab = Vocabulary.load(pooled_dir / "vocab.json")
    torch.manual_seed(0)
    m = ShowAttendTell(len(vocab), feature_dim=config["feature_dim"], embed_dim=512, hidden_dim=512, attention_dim=512,
                       grid=[7, 7], backbone=config["backbone"])
    m.vocab = vocab
    m.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pooled", default=str(REPO / "models" / "flickr8k-lite0-scst"), help="pooled model folder")
    p.add_argument("--attention", default=None, help="attention model folder (default: random weights, see above)")
    p.add_argument("--photos", default=str(REPO / "examples"), help="folder of .jpg photos")
    p.add_argument("--repeats", type=int, default=5, help="passes over the photos")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the app's setting is 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = sorted(Path(args.photos).glob("*.jpg"))
    if not photos:
        sys.exit(f"no .jpg photos in {args.photos}")
    with tempfile.TemporaryDirectory() as tmp:
        att_dir = args.attention or random_attention_model(Path(args.pooled), Path(tmp) / "att")
        models = {"pooled": load(args.pooled), "attention": load(att_dir)}
        for c in models.values():
            c.warmup()
        steps = {name: step_ms(c) for name, c in models.items()}
        photo_ms: dict[str, list[float]] = {name: [] for name in models}
        figure_ms: list[float] = []
        for _ in range(args.repeats):
            for path in photos:
                for name, c in models.items():  # interleaved: both see the same machine load
                    t = time.perf_counter()
                    r = c.caption([path])[0]
                    photo_ms[name].append((time.perf_counter() - t) * 1e3)
                    if name == "attention":
                        t = time.perf_counter()
                        c.attention_figure(c.load_image(path), r.beam[0])
                        figure_ms.append((time.perf_counter() - t) * 1e3)
    res = {"threads": args.threads, "photos": len(photos), "repeats": args.repeats,
           "step_ms": {k: round(v, 3) for k, v in steps.items()},
           "photo_p50_ms": {k: round(statistics.median(v), 1) for k, v in photo_ms.items()},
           "attention_figure_p50_ms": round(statistics.median(figure_ms), 1)}
    res["step_ratio"] = round(steps["attention"] / steps["pooled"], 2)
    res["photo_ratio"] = round(res["photo_p50_ms"]["attention"] / res["photo_p50_ms"]["pooled"], 2)
    print(f"{'':28}{'pooled':>10}{'attention':>11}{'ratio':>8}")
    print(f"{'one decoder step (ms)':28}{steps['pooled']:>10.3f}{steps['attention']:>11.3f}{res['step_ratio']:>8.2f}")
    print(f"{'one photo, p50 (ms)':28}{res['photo_p50_ms']['pooled']:>10.1f}{res['photo_p50_ms']['attention']:>11.1f}"
          f"{res['photo_ratio']:>8.2f}")
    print(f"{'attention figure, p50 (ms)':28}{'':>10}{res['attention_figure_p50_ms']:>11.1f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
