"""Console logging of a run (``mopd train`` and ``mopd pipeline``)."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]

# One line per HTTP request or database migration drowns the progress bar.
_NOISY = ("httpx", "httpcore", "mlflow", "alembic")


def configure_logging() -> None:
    """INFO lines with time, level and logger name; the chatty libraries at WARNING."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
