"""Run outputs: metrics.jsonl, summary.json, plots and the progress display."""

from fedkd.results.recorder import REQUIRED_FIELDS, TIMING_FIELDS, RunRecorder, read_metrics

__all__ = ["REQUIRED_FIELDS", "TIMING_FIELDS", "RunRecorder", "read_metrics"]
