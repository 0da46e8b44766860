"""Metric functions that return sums and counts, so that DDP ranks can add them before dividing."""

from .flow import (
    FLOW_METRIC_KEYS,
    FlowMetric,
    epe_map,
    finalize_flow_metrics,
    flow_length,
    flow_metric_sums,
)
from .language import TokenPerplexity, bits_per_token

__all__ = [
    "FLOW_METRIC_KEYS",
    "FlowMetric",
    "TokenPerplexity",
    "bits_per_token",
    "epe_map",
    "finalize_flow_metrics",
    "flow_length",
    "flow_metric_sums",
]
