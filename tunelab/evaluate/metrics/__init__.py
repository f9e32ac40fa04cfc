"""Evaluation metrics, one small module per family, and the METRICS registry that names them."""

from tunelab.evaluate.metrics.base import Metric, MetricResult
from tunelab.evaluate.metrics.registry import METRICS, check_inputs, get_metric

__all__ = ["METRICS", "Metric", "MetricResult", "check_inputs", "get_metric"]
