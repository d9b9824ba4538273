"""How sure the model is of a caption, in words a reader can act on.

    badge(0.72)     # ("likely right", "likely-right")
    badge(None)     # None: a model without a calibrator shows no verdict

``Caption.confidence`` is the estimated probability that the caption is good, by the criterion its model's
calibrator states (docs/results.md, "How sure is it?"); this module turns it into the plain-words badge the
Space, the CLI and the photo-library review show. The thresholds are fixed here, once, and documented.
"""
from __future__ import annotations

# (lowest confidence, label, css key), highest first: the first row whose threshold the confidence reaches.
BADGES: tuple[tuple[float, str, str], ...] = (
    (0.6, "likely right", "likely-right"),
    (0.3, "unsure", "unsure"),
    (0.0, "likely wrong", "likely-wrong"),
)
MEANING = ("The estimated chance that everything the caption says is backed by what people say of such "
           "photos, fitted on validation photos the model was not trained on.")


def badge(confidence: float | None) -> tuple[str, str] | None:
    """The (label, css key) for a confidence in [0, 1], or None when there is none.

    Args:
        confidence: ``Caption.confidence``.
    """
    if confidence is None:
        return None
    for threshold, label, key in BADGES:
        if confidence >= threshold:
            return label, key
    return BADGES[-1][1:]
