"""app.py, served for real: ``python app.py --model <tiny model>`` in a subprocess on 127.0.0.1, called with
gradio_client on real photos and on every kind of bad input; the server must keep answering."""
from __future__ import annotations

import base64
import html
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from storyteller.vocab import SPECIAL_TOKENS
from tests.helpers_images import write_bad_inputs, write_odd_inputs
from tests.helpers_models import save_test_model
from tests.helpers_server import REPO, running_app

EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
BAD_MESSAGES = {"not_an_image.jpg": "not an image", "empty.png": "empty", "truncated.jpg": "truncated",
                "bomb_20000x20000.png": "megapixels"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("app-model") / "tiny-lite0")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app-log") / "app.log"


@pytest.fixture(scope="module")
def client(model_dir, server_log):
    with running_app(model_dir, server_log) as url:
        yield Client(url, verbose=False, download_files=False)


def log_since(log: Path, start: int, settle: float = 0.5) -> str:
    """What the server wrote to its log after byte ``start`` (waiting ``settle`` s for it to flush)."""
    import time

    time.sleep(settle)
    return log.read_bytes()[start:].decode("utf-8", errors="replace")


def check_result(result, beam_size: int, warned: bool | None = False) -> dict:
    """The eight outputs of /caption for a pooled model: captions, their figures as text, n-best table,
    timings, notice, result (no attention gallery: a pooled model has none to show)."""
    greedy, greedy_stats, beam, beam_stats, nbest, timing, notice, data = result
    for text in (greedy, beam):
        assert isinstance(text, str) and text.strip(), result
        assert not any(tok in text for tok in SPECIAL_TOKENS), text
    assert data["greedy"]["caption"] == greedy and data["beam"][0]["caption"] == beam
    assert data["greedy"]["log_prob"] < 0 and data["beam"][0]["log_prob"] < 0
    assert data["greedy"]["ms"] > 0 and data["beam_ms"] > 0
    # every beam hypothesis comes back (the random test model's vocabulary is far wider than any beam)
    assert len(data["beam"]) == beam_size and data["beam_size"] == beam_size
    # the text shows 3 decimals of the log-probability, the JSON 4: compare numbers (formatting the JSON's
    # rounded value again could round the other way, e.g. -33.71349 -> "-33.713" but -33.7135 -> "-33.714")
    for stats, want in ((greedy_stats, data["greedy"]["log_prob"]), (beam_stats, data["beam"][0]["log_prob"])):
        shown = re.search(r"log-probability \*\*(-?[0-9.]+)\*\*", stats)
        assert shown and abs(float(shown.group(1)) - want) <= 0.00051, (stats, want)
    assert nbest.count("<tr>") == len(data["beam"]) + 1 and html.escape(beam) in nbest
    assert "backbone" in timing and "beam search" in timing
    if warned is not None:  # a tiny or flat photo is captioned with a warning, anything else without
        assert bool(notice) == bool(data["warnings"]) == warned, (notice, data["warnings"])
    return data


def real_photos(request) -> list[Path]:
    """Up to three full-resolution Flickr8k photos where the shared data exists, else examples/."""
    try:
        d = request.getfixturevalue("fullres_dir")
    except pytest.skip.Exception:
        return EXAMPLES[:3]
    rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    return [d / r["file_name"] for r in rows]


def test_api_names_its_parameters_and_outputs_and_a_pooled_model_has_no_gallery(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/caption", "/caption_json"}
    for name in ("/caption", "/caption_json"):
        params = [p["parameter_name"] for p in api[name]["parameters"]]
        assert params == ["image", "beam_size", "max_len", "alpha"], params
        assert [p["parameter_has_default"] for p in api[name]["parameters"]] == [False, True, True, True]
        labels = [r["label"] for r in api[name]["returns"]]
        assert labels and not any(label.startswith("value_") for label in labels), labels
        assert not any(r["component"] == "Gallery" for r in api[name]["returns"])  # a pooled model: no attention view
    assert [r["label"] for r in api["/caption"]["returns"]] == [
        "Greedy caption", "Greedy figures", "Beam search caption", "Beam search figures", "n-best list", "timings",
        "notice", "result"]


def check_json(out: dict, beam_size: int) -> None:
    """The /caption_json object: the keys, words that make the text, parts that add up to log_prob."""
    assert set(out) == {"greedy", "beam", "n_best", "parting", "timings_ms", "warnings", "model"}  # no attention: pooled
    assert len(out["n_best"]) == beam_size and out["n_best"][0] == out["beam"]
    for cap in [out["greedy"], *out["n_best"]]:
        assert set(cap) == {"text", "words", "word_log_probs", "end_log_prob", "log_prob", "score", "confidence"}
        assert cap["confidence"] is None  # the test model has no calibrator: null, never a made-up number
        assert " ".join(cap["words"]) == cap["text"] and len(cap["word_log_probs"]) == len(cap["words"])
        assert abs(sum(cap["word_log_probs"]) + (cap["end_log_prob"] or 0) - cap["log_prob"]) <= 2e-3, cap
    assert out["model"]["decoding"]["beam_size"] == beam_size and out["model"]["label"] == "tiny-lite0"
    assert out["timings_ms"]["scoring"] > 0 and out["timings_ms"]["total"] >= out["timings_ms"]["search"]
    if out["greedy"]["words"] == out["beam"]["words"]:
        assert out["parting"] is None
    else:
        part = out["parting"]
        t = part["step"]
        assert out["greedy"]["words"][:t] == out["beam"]["words"][:t] == part["shared"]
        assert part["greedy"]["word"] != part["beam"]["word"] and len(part["greedy"]["top"]) == 5


def test_caption_json_on_real_photos(client, request):
    for path in real_photos(request)[:2]:
        out = client.predict(handle_file(str(path)), 4, 12, 0.5, api_name="/caption_json")
        check_json(out, 4)
        assert out["model"]["decoding"]["max_len"] == 12 and out["model"]["decoding"]["alpha"] == 0.5


def test_the_readme_snippet_runs_against_the_server(client, tmp_path):
    """The fenced python block of README.md that calls caption_json, pointed at the test server."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("\n", 1)[1] for b in readme.split("```python")[1:]]
    snippet = next(b.split("```")[0] for b in blocks if "caption_json" in b.split("```")[0])
    assert 'Client("http://127.0.0.1:7860/")' in snippet
    code = snippet.replace("http://127.0.0.1:7860/", client.src)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert run.returncode == 0, run.stderr[-2000:]
    text, log_prob = run.stdout.strip().rsplit(" ", 1)
    assert text and float(log_prob) < 0


def test_real_photos_get_captions(client, request):
    photos = real_photos(request)
    assert photos, "no photos: examples/ is empty"
    for path in photos:
        check_result(client.predict(handle_file(str(path)), 5, 20, 0.0, api_name="/caption"), 5)


def test_example_photos_get_captions(client):
    assert 4 <= len(EXAMPLES) <= 6
    for path in EXAMPLES[:2]:
        check_result(client.predict(handle_file(str(path)), 3, 12, 0.5, api_name="/caption"), 3)


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_bad_input_is_a_clear_error_and_the_server_keeps_working(client, tmp_path, name):
    path = write_bad_inputs(tmp_path)[name]
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(path)), 5, 20, 0.0, api_name="/caption")
    assert BAD_MESSAGES[name] in str(e.value), str(e.value)
    check_result(client.predict(handle_file(str(EXAMPLES[0])), 2, 8, 0.0, api_name="/caption"), 2)


@pytest.mark.parametrize("name", ["cmyk.jpg", "rgba.png", "gray16.png", "gray.png", "animated.gif"])
def test_unusual_images_are_captioned(client, tmp_path, name):
    path = write_odd_inputs(tmp_path)[name]
    check_result(client.predict(handle_file(str(path)), 3, 10, 0.0, api_name="/caption"), 3, warned=None)


def test_bad_settings_and_missing_image_are_errors(client):
    photo = handle_file(str(EXAMPLES[0]))
    for beam, max_len, alpha, words in [(0, 20, 0.0, "Beam width"), (11, 20, 0.0, "Beam width"),
                                        (5, 0, 0.0, "Max length"), (5, 20, 9.0, "alpha"),
                                        (2.5, 20, 0.0, "Beam width must be a whole number"),
                                        (5, 12.5, 0.0, "Max length must be a whole number")]:
        for endpoint in ("/caption", "/caption_json"):
            with pytest.raises(AppError, match=words):
                client.predict(photo, beam, max_len, alpha, api_name=endpoint)
    with pytest.raises(AppError, match="photo first"):
        client.predict(None, 5, 20, 0.0, api_name="/caption")
    check_result(client.predict(photo, 5.0, 20, 0.0, api_name="/caption"), 5)  # 5.0 is a whole number


def test_missing_model_fails_at_start_with_one_clear_line(tmp_path):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(tmp_path / "no-such-model")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1
    assert "cannot start" in run.stderr and "no model folder" in run.stderr and "Traceback" not in run.stderr


# -- the pure helpers, in process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_module(model_dir):
    import torch

    old, threads = os.environ.get("STORYTELLER_MODEL"), torch.get_num_threads()
    os.environ["STORYTELLER_MODEL"] = str(model_dir)  # `gradio app.py` reload mode picks the model this way
    try:
        sys.modules.pop("app", None)
        yield importlib.import_module("app")
    finally:
        sys.modules.pop("app", None)
        torch.set_num_threads(threads)  # app.py sets its share of the cores at import
        if old is None:
            os.environ.pop("STORYTELLER_MODEL", None)
        else:
            os.environ["STORYTELLER_MODEL"] = old


def test_module_level_demo_and_event(app_module):
    import gradio as gr

    assert isinstance(app_module.demo, gr.Blocks)
    fns = list(app_module.demo.fns.values())
    caption = [f for f in fns if f.api_name == "caption"]
    assert len(caption) == 1 and caption[0].preprocess is False  # our loader sees the raw upload
    assert app_module.captioner.source == os.environ["STORYTELLER_MODEL"]


def test_image_source_accepts_paths_filedata_and_data_urls(app_module):
    import gradio as gr

    assert app_module.image_source({"path": "/tmp/x.png", "url": None}) == "/tmp/x.png"
    assert app_module.image_source("/tmp/y.jpg") == "/tmp/y.jpg"
    data = base64.b64encode(b"\x89PNG....").decode()
    assert app_module.image_source({"path": None, "url": f"data:image/png;base64,{data}"}) == b"\x89PNG...."
    for bad in (None, {"path": None, "url": None}, {"path": None, "url": "data:image/png;base64,@@@"}):
        with pytest.raises(gr.Error):
            app_module.image_source(bad)


def test_model_panel_shows_backbone_and_scores(app_module):
    info = {"model": "me/m", "revision": "v1", "backbone": "efficientnet_lite0", "backbone_weights": "pkg:w.pth",
            "feature_dim": 1280, "vocab_size": 37, "embed_dim": 16, "hidden_dim": 32, "num_layers": 1,
            "dataset": {"name": "flickr8k"}, "metrics": {"bleu4": 0.1, "cider": 0.2},
            "evaluations": [{"dataset_name": "flickr8k", "split": "validation",
                             "methods": {"greedy": {"bleu1": 0.55, "bleu4": 0.15, "cider": 0.4}}}]}
    md = app_module.model_markdown(info)
    assert "`me/m` @ `v1`" in md and "efficientnet_lite0" in md and "flickr8k" in md and "`w.pth`" in md
    assert "one 1280-d pooled feature vector" in md and "grid" not in md
    assert "**Scores on flickr8k validation**" in md and "| greedy | 0.550 | 0.150 | 0.400 |" in md
    info["evaluations"] = []
    md = app_module.model_markdown(info)
    assert "**Scores on validation (during training)**" in md and "| greedy | - | 0.100 | 0.200 |" in md
    info["metrics"] = {}
    assert "No evaluation figures" in app_module.model_markdown(info)
    # a Hub model links to its repo at the revision served; an attention model says what it reads
    info.update(hub=True, revision="0123456789abcdef0123456789abcdef01234567", decoder="show_attend_tell")
    md = app_module.model_markdown(info, grid=[7, 7])
    assert "[me/m](https://huggingface.co/me/m/tree/0123456789abcdef0123456789abcdef01234567) @ `0123456789ab`" in md
    assert "a 7x7 grid of 1280-d features" in md and "pooled" not in md


def test_model_panel_names_the_dataset_not_its_path(app_module):
    info = {"model": "m", "dataset": {"source": "/home/alice/private/flickr8k", "kind": "imagefolder"}}
    md = app_module.model_markdown(info)
    assert "**Trained on**: flickr8k" in md and "/home/alice" not in md
    info["dataset"] = {"source": "nlphuji/flickr30k", "kind": "hub"}
    assert "**Trained on**: nlphuji/flickr30k" in app_module.model_markdown(info)


def test_slider_defaults_are_the_models_recommendation_moved_into_range(app_module):
    defaults = app_module.slider_defaults
    assert defaults({"beam_size": 3, "max_len": 16, "alpha": 0.5}) == {"beam_size": 3, "max_len": 16, "alpha": 0.5}
    assert defaults({"beam_size": 12, "max_len": 50, "alpha": 3.0}) == {"beam_size": 10, "max_len": 40, "alpha": 2.0}
    assert defaults({"beam_size": 0, "max_len": 0, "alpha": -1.0}) == {"beam_size": 1, "max_len": 1, "alpha": 0.0}
    assert defaults({"alpha": float("nan")}) == {"beam_size": 3, "max_len": 20, "alpha": 0.0}  # DECODING_DEFAULTS


def test_built_sliders_start_inside_their_ranges(app_module, monkeypatch):
    """A model recommending max_len 50 must not make the page's first request fail "between 1 and 40"."""
    import gradio as gr

    monkeypatch.setattr(app_module.captioner, "decoding", {"beam_size": 20, "max_len": 50, "alpha": 2.5,
                                                           "no_repeat_ngram_size": 3, "min_len": 1})
    demo = app_module.build_demo(app_module.captioner)
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert len(sliders) == 3
    for slider in sliders.values():
        assert slider.minimum <= slider.value <= slider.maximum, slider.label
    assert sliders["Max length (decoder steps, <end> included)"].value == 40 and sliders["Beam width"].value == 10


@pytest.mark.parametrize("payload, gradios_words", [
    ({"path": str(REPO / "app.py"), "meta": {"_type": "gradio.FileData"}}, "not uploaded by a user"),
    (str(REPO / "app.py"), "ValidationError")])
def test_files_not_uploaded_by_the_user_are_refused_by_gradio(client, server_log, payload, gradios_words):
    """With preprocessing off, Gradio itself must refuse to hand the handler a server-side path: the
    handler never runs (it would log "caption refused ... not an image" for app.py), Gradio logs why."""
    import urllib.request

    base = client.src.rstrip("/")
    start = server_log.stat().st_size
    req = urllib.request.Request(f"{base}/gradio_api/call/caption", method="POST",
                                 data=json.dumps({"data": [payload, 5, 20, 0.0]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{base}/gradio_api/call/caption/{event_id}", timeout=60) as r:
        stream = r.read().decode()
    assert "event: error" in stream and "event: complete" not in stream, stream
    assert "not an image" not in stream  # not our image check's message
    log = log_since(server_log, start)
    assert gradios_words in log and "caption refused" not in log, log
    check_result(client.predict(handle_file(str(EXAMPLES[0])), 2, 8, 0.0, api_name="/caption"), 2)


def test_user_errors_log_one_line_without_a_traceback(client, server_log, tmp_path):
    bad = write_bad_inputs(tmp_path)
    for name, words in (("not_an_image.jpg", "not an image"), ("truncated.jpg", "truncated")):
        start = server_log.stat().st_size
        with pytest.raises(AppError, match=words):
            client.predict(handle_file(str(bad[name])), 3, 10, 0.0, api_name="/caption")
        lines = [line for line in log_since(server_log, start).splitlines() if "httpx" not in line and line.strip()]
        assert len(lines) == 1 and "caption refused" in lines[0] and words in lines[0], lines
    start = server_log.stat().st_size
    with pytest.raises(AppError, match="photo first"):
        client.predict(None, 3, 10, 0.0, api_name="/caption")
    log = log_since(server_log, start)
    assert log.count("caption refused") == 1 and "Traceback" not in log, log


def page(app_module, *inputs) -> tuple:
    """The page's first event's outputs (FIRST_OUTPUTS), without the captioned photo it keeps for the chained one."""
    return app_module.caption_for_page(app_module.captioner, app_module.FIRST_OUTPUTS, *inputs)[0]


def cleared_but_the_notice(app_module, out: tuple) -> bool:
    return all(v == app_module.CLEARED[n] for n, v in zip(app_module.FIRST_OUTPUTS, out) if n != "notice")


def test_unexpected_errors_still_log_a_traceback_and_the_page_says_so(app_module, caplog, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module.captioner, "caption_features", broken)
    photo = {"path": str(EXAMPLES[0]), "url": None}
    with caplog.at_level("INFO", logger="storyteller.app"):
        out = page(app_module, photo, 3, 10, 0.0)
    assert cleared_but_the_notice(app_module, out) and "Something went wrong" in out[app_module.FIRST_OUTPUTS.index("notice")]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_page_refusals_are_one_notice_over_cleared_outputs(app_module, tmp_path, caplog):
    bad = write_bad_inputs(tmp_path)["not_an_image.jpg"]
    with caplog.at_level("INFO", logger="storyteller.app"):
        out = page(app_module, {"path": str(bad), "url": None}, 3, 10, 0.0)
    notice = out[app_module.FIRST_OUTPUTS.index("notice")]
    assert cleared_but_the_notice(app_module, out)
    assert notice.count("notice-error") == 1 and "not an image" in notice and "Pillow" not in notice
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback


def test_the_button_without_a_photo_says_what_to_do(app_module):
    out = page(app_module, None, 3, 10, 0.0)
    notice = out[app_module.FIRST_OUTPUTS.index("notice")]
    assert "notice-error" in notice and "Upload, paste or take a photo first" in notice and "example" in notice
    assert cleared_but_the_notice(app_module, out)


def test_the_n_best_view_has_every_beam_caption(app_module):
    """The page asks the beam for all its hypotheses (n_best = beam width): the n-best table has a row per
    beam, and when greedy and beam search agree, the runner-up line quotes the beam's second caption."""
    photo = {"path": str(EXAMPLES[0]), "url": None}
    c = app_module.caption_and_score(app_module.captioner, photo, 4, 10, 0.0)
    assert len(c.result.beam) == 4 and len(c.scored) == 5
    values = app_module.page_values(app_module.captioner, c)
    assert values["n-best list"].count("<tr>") == 1 + 4
    for b in c.result.beam:
        assert html.escape(b.text) in values["n-best list"]
    c.scored[0] = c.scored[1]  # as if greedy had written the beam's caption: the "they agree" line
    c.result.greedy = c.result.beam[0]
    agree = app_module.changed_html(app_module.captioner.model.vocab, c)
    assert "agree" in agree and html.escape(c.result.beam[1].text) in agree and html.escape(c.result.beam[2].text) in agree


def test_where_they_part_shows_the_first_differing_word_and_the_top_next_words(app_module):
    from storyteller.scoring import ScoredCaption

    photo = {"path": str(EXAMPLES[0]), "url": None}
    c = app_module.caption_and_score(app_module.captioner, photo, 3, 10, 0.0)
    vocab = app_module.captioner.model.vocab
    g = c.scored[1]
    # greedy made to differ from the beam at word 2: the view names that step, both words and the top words there
    other = next(tok for tok, _ in g.top[2] if tok != g.tokens[2])
    c.scored[0] = ScoredCaption(g.tokens[:2] + [other], g.word_log_probs[:2] + [-1.0], None, g.top[:3] + [[]])
    view = app_module.changed_html(vocab, c)
    part = app_module.parting_record(vocab, c)
    assert part["step"] == 2 and part["shared"] == [vocab.itos[t] for t in g.tokens[:2]]
    assert part["greedy"]["word"] == vocab.itos[other] and part["beam"]["word"] == vocab.itos[g.tokens[2]]
    assert 'id="parting"' in view and "(word 3)" in view and view.count("<tr") == 1 + len({w for w, _ in g.top[2]})
    for tok, lp in g.top[2]:
        assert f"<td>{html.escape(vocab.itos[tok])}</td>" in view


def test_words_are_shaded_by_probability_with_the_value_on_hover_and_tap(app_module):
    from storyteller.scoring import ScoredCaption

    vocab = app_module.captioner.model.vocab
    s = ScoredCaption([4, 5], [-0.105360516, -2.302585093], -0.5108256, [])
    view = app_module.words_html(vocab, s, "Greedy")
    assert view.count('class="w"') == 2 and 'class="w end"' in view and view.count('tabindex="0"') == 3
    assert 'style="--p:0.900"' in view and 'data-p="90.0%"' in view and 'title="probability 0.1000' in view
    assert "cut at max length" in app_module.words_html(vocab, ScoredCaption([4], [-1.0], None, []), "Beam")


def test_space_model_reference(app_module, tmp_path):
    assert app_module.space_model(tmp_path) is None
    (tmp_path / app_module.SPACE_MODEL_FILE).write_text("# the model this Space serves\n\nme/tiny@0123abc\n")
    assert app_module.space_model(tmp_path) == ("me/tiny", "0123abc")
    (tmp_path / app_module.SPACE_MODEL_FILE).write_text("me/tiny\n")
    assert app_module.space_model(tmp_path) == ("me/tiny", None)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / app_module.SPACE_MODEL_FILE).write_text("models/tiny\n")
    assert app_module.space_model(tmp_path) == (str(tmp_path / "models" / "tiny"), None)


def test_start_up_says_the_model_is_loading(client, server_log):
    log = server_log.read_text(encoding="utf-8", errors="replace")
    assert "loading the model" in log and "model ready in" in log
    assert log.index("loading the model") < log.index("model ready in")


@pytest.mark.parametrize("size, colour, words", [((1, 1), (255, 0, 0), "1x1 pixels"),
                                                 ((20, 400), None, "20x400 pixels"),
                                                 ((640, 480), (200, 200, 200), "flat colour")])
def test_degenerate_photos_are_captioned_with_a_visible_warning(client, tmp_path, size, colour, words):
    from PIL import Image

    from tests.helpers_images import photo_like

    path = tmp_path / "odd.png"
    (Image.new("RGB", size, colour) if colour else photo_like(size)).save(path)
    out = client.predict(handle_file(str(path)), 3, 10, 0.0, api_name="/caption")
    data = check_result(out, 3, warned=True)
    assert words in out[6] and "notice-warning" in out[6] and any(words in w for w in data["warnings"])


def test_uploaded_files_are_deleted_after_their_max_age(model_dir, tmp_path):
    """A long-running Space must not keep every upload: files older than --upload-max-age go."""
    import time
    import urllib.request

    temp = tmp_path / "gradio-tmp"
    env = {"GRADIO_TEMP_DIR": str(temp)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with running_app(model_dir, tmp_path / "app.log", extra_args=("--upload-max-age", "3")) as url:
            boundary = "----storytellertest"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"photo.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n").encode() + EXAMPLES[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
            req = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                uploaded = Path(json.loads(r.read())[0])
            assert uploaded.is_file() and temp in uploaded.parents
            deadline = time.monotonic() + 30
            while uploaded.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not uploaded.exists(), "the upload outlived --upload-max-age 3 by 30 s"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("damage, words", [("lfs", "Git LFS pointer"), ("truncate", "truncated")])
def test_broken_weights_fail_at_start_with_one_clear_line(model_dir, tmp_path, damage, words):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n" if damage == "lfs"
                        else data[: len(data) // 3])
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(broken)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("app.py: cannot start:") and words in lines[0], lines


def test_attention_model_view_json_maps_and_api(app_module, tmp_path):
    """An attention model: one tile per beam word on the page (the photo encoded once, a heat layer per word),
    one map per word in the JSON, and the view advertised in /caption's API (a pooled model's is not)."""
    from storyteller.captioner import load
    from tests.helpers_models import save_test_model

    captioner = load(save_test_model(tmp_path / "att", attention=True))
    photo = {"path": str(EXAMPLES[0]), "url": None}
    beam, view = app_module.caption_photo(captioner, ("beam caption", "attention"), photo, 2, 8, 0.0)
    words = re.findall(r'<details class="att-tile" data-word="([^"]*)"', view)
    assert words == [html.escape(w) for w in beam.split()]
    assert view.count("data:image/jpeg;base64,") == 1  # the photo once, whatever the number of words
    assert view.count("data:image/png;base64,") == len(words)  # a heat layer per word, shared by tile and enlarged
    assert "att-legend" in view and "Show-Attend-Tell" in view
    c = app_module.caption_and_score(captioner, photo, 2, 8, 0.0)
    out = app_module.caption_json(captioner, c, app_module.model_summary(captioner, captioner.info))
    maps = out["attention"]
    assert len(maps) == len(out["beam"]["words"]) and len(maps[0]) == 7 and len(maps[0][0]) == 7
    assert abs(sum(map(sum, maps[0])) - 1) < 1e-2  # each word's weights over the grid sum to 1
    api = app_module.build_demo(captioner, max_batch=1).get_api_info()["named_endpoints"]
    assert [r["label"] for r in api["/caption"]["returns"]][-1].startswith("Where it looked")
    assert "grid" in app_module.header_html(captioner) and "one feature vector" not in app_module.header_html(captioner)


def test_the_page_shows_captions_first_and_the_extras_in_a_chained_event(app_module):
    """The first event's outputs hold the captions, words and badges but no attention view and no parting, and
    score nothing (the words are shaded by what the search recorded); the chained event scores the two captions
    shown on the features the first one kept and fills those in."""
    photo = {"path": str(EXAMPLES[0]), "url": None}
    values, c = app_module.caption_for_page(app_module.captioner, app_module.FIRST_OUTPUTS, photo, 3, 10, 0.0)
    named = dict(zip(app_module.FIRST_OUTPUTS, values))
    best = c.result.beam[0]
    assert named["beam caption"] == best.text and 'class="words"' in named["beam words"]
    assert f"(log-probability {best.word_log_probs[0]:.3f})" in named["beam words"]
    assert "attention" not in app_module.FIRST_OUTPUTS and "what beam search changed" not in app_module.FIRST_OUTPUTS
    assert c.scored == [] and "scoring" not in c.timings  # nothing scored on the captions' path
    later = app_module.later_values(app_module.captioner, c)
    assert len(c.scored) == 2  # then greedy's caption and the best, not every hypothesis
    for cap, s in zip([c.result.greedy, best], c.scored):
        assert cap.word_log_probs == pytest.approx(s.word_log_probs, abs=1e-4)
    assert later["what beam search changed"] and later["attention"] == ""  # a pooled model: no view
    assert app_module.later_values(app_module.captioner, None) == {"what beam search changed": "", "attention": ""}
    fns = {f.api_name: f for f in app_module.demo.fns.values()}
    assert fns["caption_page"].preprocess is False


def test_caption_json_carries_each_captions_confidence_or_null(app_module, monkeypatch):
    photo = {"path": str(EXAMPLES[0]), "url": None}
    captioner = app_module.captioner
    summary = app_module.model_summary(captioner, captioner.info)
    out = app_module.caption_json(captioner, app_module.caption_and_score(captioner, photo, 3, 10, 0.0), summary)
    assert [e["confidence"] for e in [out["greedy"], *out["n_best"]]] == [None] * 4  # no calibrator: null, not made up
    c = app_module.caption_and_score(captioner, photo, 3, 10, 0.0)
    for i, cap in enumerate([c.result.greedy, *c.result.beam]):
        cap.confidence = 0.1 + 0.2 * i
    out = app_module.caption_json(captioner, c, summary)
    assert [e["confidence"] for e in [out["greedy"], *out["n_best"]]] == [0.1, 0.3, 0.5, 0.7]
    assert out["beam"]["confidence"] == 0.3
    named = dict(zip(app_module.FIRST_OUTPUTS, [app_module.caption_values(captioner, c)[n]
                                                 for n in app_module.FIRST_OUTPUTS]))
    assert 'class="confidence conf-likely-wrong"' in named["greedy words"]
    assert 'class="confidence conf-unsure"' in named["beam words"]
    assert named["result"]["beam"][0]["confidence"] == 0.3


def test_a_refused_file_says_why_once(app_module, tmp_path):
    import gradio as gr

    bad = write_bad_inputs(tmp_path)["not_an_image.jpg"]
    with pytest.raises(gr.Error) as e:
        app_module.caption_and_score(app_module.captioner, {"path": str(bad), "url": None}, 3, 10, 0.0)
    assert e.value.title == "Not a usable image" and "not an image" in e.value.message
    assert "Cannot caption this file" not in e.value.message and "usable image" not in e.value.message


def test_concurrent_requests_are_captioned_together_with_the_same_captions(app_module):
    """The batch route: eight requests at once are captioned in fewer batches, each with the captions it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    captioner = app_module.captioner
    alone = [app_module.caption_and_score(captioner, {"path": str(p), "url": None}, 3, 10, 0.0, score_all=False)
             for p in EXAMPLES[:4]]
    route = app_module.Route(captioner, max_batch=8)
    photos = [{"path": str(EXAMPLES[i % 4]), "url": None} for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: app_module.caption_and_score(captioner, p, 3, 10, 0.0, score_all=False,
                                                                  route=route), photos))
    for i, c in enumerate(got):
        want = alone[i % 4]
        assert c.result.greedy.text == want.result.greedy.text and c.result.beam[0].text == want.result.beam[0].text
        assert [round(x, 3) for x in c.scored[1].word_log_probs] == [round(x, 3) for x in want.scored[1].word_log_probs]
    assert max(c.timings["batch"] for c in got) > 1  # some were captioned together


def test_gradio_keeps_the_pages_of_at_most_sessions_browser_sessions(app_module):
    """Gradio keeps every session's last inputs and outputs (the attention view's images among them) until newer
    sessions push it out; ``--sessions`` bounds that memory (a soak grew by 0.3 MB a request with Gradio's 10,000).
    The real launch options, on the real server, with 6 visitors: the 3 most recent are kept."""
    import uuid

    import httpx

    from tests.helpers_server import free_port

    args = app_module._parse_args(["--sessions", "3", "--port", str(free_port())])
    demo = app_module.demo
    demo.launch(**app_module.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        api = f"http://127.0.0.1:{args.port}/gradio_api/"
        fn = next(d["id"] for d in httpx.get(api.replace("gradio_api/", "config")).json()["dependencies"]
                  if d.get("api_name") == "caption")
        with httpx.Client(timeout=60) as http:
            for _ in range(6):
                with open(EXAMPLES[0], "rb") as f:
                    path = http.post(api + "upload", files=[("files", (EXAMPLES[0].name, f))]).json()[0]
                session = uuid.uuid4().hex
                photo = {"path": path, "orig_name": EXAMPLES[0].name, "meta": {"_type": "gradio.FileData"}}
                http.post(api + "queue/join", json={"data": [photo, 2, 12, 0.0], "fn_index": fn,
                                                    "session_hash": session}).raise_for_status()
                with http.stream("GET", api + "queue/data", params={"session_hash": session}) as stream:
                    done = [json.loads(line[5:]) for line in stream.iter_lines() if '"process_completed"' in line]
                assert done and done[0]["success"], done
        assert len(demo.state_holder.session_data) == 3
    finally:
        demo.close()


def test_the_total_time_counts_every_stage_the_request_paid_for(app_module, monkeypatch):
    """``total`` is decode + resize, backbone, searches, confidence (where the model is calibrated) and scoring,
    each counted once: made by the same code as the CLI's, not summed again from some of its parts (a slow
    stand-in calibrator makes a missing confidence stage show)."""
    import time

    class SlowCalibrator:
        def annotate(self, features, results):
            time.sleep(0.03)
            for r in results:
                for c in [r.greedy, *r.beam]:
                    c.confidence = 0.5

    monkeypatch.setattr(app_module.captioner, "calibrator", SlowCalibrator())
    photo = {"path": str(EXAMPLES[0]), "url": None}
    for score_all in (True, None):
        t = app_module.caption_and_score(app_module.captioner, photo, 3, 10, 0.0, score_all=score_all).timings
        parts = ("preprocess", "backbone", "search", "confidence", "scoring")
        assert ("scoring" in t) == (score_all is not None) and t["confidence"] >= 30
        assert sum(t.get(k, 0.0) for k in parts) <= t["total"] <= sum(t.get(k, 0.0) for k in parts) + 5.0, t
