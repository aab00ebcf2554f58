"""Measurements of a trained adapter: accuracy, perplexity, diagnostics, plots."""
