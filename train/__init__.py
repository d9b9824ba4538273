"""Training-side commands: ``python -m train {extract,fit,evaluate}`` (see train/__main__.py)."""
