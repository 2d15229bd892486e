"""Thin Prefect tasks over `serving`. Every flow imports this package, so importing it makes the
run loggers tell expected failures in one line (tasks/outcomes.py) wherever flows run: the CLI,
a worker's flow-run process (which loads a flow file by path, not as `flows.*`), a test."""

from tasks.outcomes import log_expected_failures_in_one_line

log_expected_failures_in_one_line()
