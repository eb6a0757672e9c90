"""MRAnnotator."""
