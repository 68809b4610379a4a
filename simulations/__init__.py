"""Entry points: `fedkd-sim` (this package's run.py) and, later, reports and benchmarks."""
