"""Golden regression runs: recorded metrics of a few short runs (tests/test_golden.py)."""
