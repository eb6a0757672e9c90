"""MRAnnotator MONAI Label app: a thin adapter over the ``mrannotator`` engine."""
