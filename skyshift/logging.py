"""structlog configuration. Only entry points (launch_*.py, skyctl) call `configure`;
library code just does `log = structlog.get_logger(__name__)` and logs constant event names
with key/value context."""
from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO


def configure(level: str = "info", json: bool = False, stream: Optional[TextIO] = None) -> None:
    import structlog

    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=stream or sys.stderr, format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
