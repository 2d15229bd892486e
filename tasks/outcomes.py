"""Expected failures in one line. Prefect logs every exception that ends a task or flow run with
its traceback; for an ExpectedFailure (the Hub has no such revision, a proof failed) that is
noise around a message that already says it all. Bugs keep theirs."""

from __future__ import annotations

import logging

from serving.core.errors import EXPECTED_FAILURE_RECORD, ExpectedFailure

# Where Prefect's engines log the runs, and from where its API handler ships them.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OneLineExpectedFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ExpectedFailure):
            record.exc_info, record.exc_text = None, None
            setattr(record, EXPECTED_FAILURE_RECORD, True)
        return True


def log_expected_failures_in_one_line() -> None:
    """Idempotent. A logger's filters survive Prefect reconfiguring its logging (dictConfig
    keeps them), as a Prefect server starting in the same process does."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(each, OneLineExpectedFailures) for each in logger.filters):
            logger.addFilter(OneLineExpectedFailures())
