"""storyteller.render without a server: the confidence badge (one place), word shading, the attention view."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest
from PIL import Image

from storyteller.confidence import MEANING, badge
from storyteller.decoding import Caption
from storyteller.render import attention_html, attention_note, confidence_html, legend_html, words_html
from storyteller.scoring import ScoredCaption
from storyteller.vocab import Vocabulary


def caption(confidence):
    return Caption(text="a dog runs", tokens=[4, 5, 6], log_prob=-2.0, score=-2.0, finished=True,
                   confidence=confidence)


@pytest.mark.parametrize("conf", [0.05, 0.3, 0.45, 0.6, 0.93])
def test_a_confidence_is_a_plain_words_badge_with_the_number_on_hover_and_tap(conf):
    view = confidence_html(caption(conf))
    label, key = badge(conf)
    assert f'class="confidence conf-{key}"' in view and f">{label}</summary>" in view
    number = f"{100 * conf:.0f}%"
    assert re.search(rf'<summary class="badge" title="[^"]*{re.escape(number)}"', view)  # hover
    assert f"<strong>{number}</strong>" in view.split("</summary>", 1)[1]  # a tap opens the details
    assert html.escape(MEANING) in view  # what it means, in one line


def test_no_confidence_no_badge():
    assert confidence_html(caption(None)) == ""
    vocab = Vocabulary(["a", "dog", "runs"])
    s = ScoredCaption([4, 5, 6], [-0.1, -0.2, -0.3], -0.4, [])
    assert "confidence" not in words_html(vocab, s, "Greedy", caption(None))
    assert words_html(vocab, s, "Greedy", caption(0.8)).startswith('<details class="confidence conf-likely-right"')


def test_attention_view_encodes_the_photo_once_labels_under_tiles_with_legend_and_note():
    photo = Image.new("RGB", (640, 427), (90, 120, 60))
    maps = np.random.default_rng(0).random((3, 7, 7))
    view = attention_html(photo, ["a", "dog", "<b>"], maps, {"resize": 256, "crop": 224}, note="From member 2.")
    assert view.count("data:image/jpeg;base64,") == 1 and view.count("data:image/png;base64,") == 3
    tiles = re.findall(r'<details class="att-tile".*?</details>', view)
    assert len(tiles) == 3 and "&lt;b&gt;" in tiles[2] and "<b>" not in tiles[2]
    for t in tiles:  # the word is a figcaption after the picture, not drawn on it
        assert t.index('class="att-pic"') < t.index("<figcaption>") < t.index("att-big")
    assert "From member 2." in view and "not looked at" in legend_html()


def test_attention_note_names_the_ensemble_member_with_the_maps():
    info = {"members": [{"decoder": "show_and_tell"}, {"decoder": "show_attend_tell", "num_layers": 1,
                                                        "hidden_dim": 512}]}
    assert "member 2 of the ensemble's 2" in attention_note(info) and "1 x 512" in attention_note(info)
    assert "Show-Attend-Tell decoder" in attention_note({"members": None})


def test_heat_layer_over_the_photo_gives_the_overlay():
    """The page lays an RGBA layer over the photo; composited it must give heatmap.overlay's picture."""
    from storyteller.heatmap import HeatLayer, PhotoOverlay

    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    prep = {"resize": 256, "crop": 224}
    m = rng.random((7, 7))
    layer = HeatLayer(photo.size, prep, width=80)(m)
    assert layer.size == photo.size and layer.mode == "RGBA"
    composed = Image.alpha_composite(photo.convert("RGBA"), layer).convert("RGB")
    want = PhotoOverlay(photo, prep)(m)
    diff = np.abs(np.asarray(composed, dtype=int) - np.asarray(want, dtype=int))
    assert diff.max() <= 3, diff.max()


def test_the_runner_up_note_shows_the_score_the_captions_are_ranked_by():
    from types import SimpleNamespace

    from storyteller.render import Captioned, agree_html

    beams = [SimpleNamespace(text=t, log_prob=lp, score=sc) for t, lp, sc in
             (("a dog", -1.0, -0.5), ("a brown dog", -1.5, -0.61), ("the dog", -1.2, -0.74))]
    c = Captioned(None, SimpleNamespace(beam=beams, greedy=beams[0]), [], 3, 20, 0.7)
    line = agree_html(c)
    assert "score -0.61" in line and "score -0.74" in line  # what the beam ranked them by
    assert "log-prob -1.50" in line  # and, with length normalisation on, the raw log-probability too
    c.alpha = 0.0
    assert "log-prob" not in agree_html(c) and "score -0.61" in agree_html(c)
