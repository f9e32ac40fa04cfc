"""Evaluation: generate outputs, score them with metrics, classify failures, compare runs in a report."""
