"""Logging in the AMCT format.

Lines read ``%(asctime)s - %(levelname)s - [AMCT]:[AMCT]: message``. The console level comes
from the environment variable ``AMCT_LOG_LEVEL`` and the level of the log file
``./amct_log/<name>.log`` from ``AMCT_LOG_FILE_LEVEL`` (DEBUG, INFO, WARNING or ERROR; INFO by
default). The log folder is created on the first record written, not at import time.
"""
from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s - %(levelname)s - [AMCT]:[AMCT]: %(message)s"
LOG_DIR = "amct_log"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "WARN": logging.WARNING, "ERROR": logging.ERROR}


def _level_from_env(variable: str) -> int:
    value = os.environ.get(variable, "INFO").strip().upper()
    if value not in _LEVELS:
        sys.stderr.write(
            f"[AMCT]:[AMCT]: {variable}={value!r} is not a log level; use one of "
            f"DEBUG, INFO, WARNING, ERROR. INFO is used.\n")
        return logging.INFO
    return _LEVELS[value]


class _LazyDirFileHandler(logging.FileHandler):
    """A file handler that creates ./amct_log/ only when the first record arrives."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


class _StreamToCurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at emit time (so redirection and capture work)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def get_logger(name: str = "amct") -> logging.Logger:
    """Return the AMCT logger ``name`` (e.g. ``amct_pytorch``), configured once.

    Console and file levels are read from ``AMCT_LOG_LEVEL`` and ``AMCT_LOG_FILE_LEVEL`` when
    the logger is first requested; :func:`reset_levels` re-reads them.
    """
    logger = logging.getLogger(f"amct.{name}")
    if getattr(logger, "_amct_configured", False):
        return logger
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    formatter = logging.Formatter(LOG_FORMAT)
    console = _StreamToCurrentStdout()
    console.setFormatter(formatter)
    console.set_name("amct_console")
    log_file = os.path.abspath(os.path.join(LOG_DIR, f"{name}.log"))
    file_handler = _LazyDirFileHandler(log_file)
    file_handler.setFormatter(formatter)
    file_handler.set_name("amct_file")
    logger.addHandler(console)
    logger.addHandler(file_handler)
    logger._amct_configured = True  # type: ignore[attr-defined]
    reset_levels(logger)
    return logger


def reset_levels(logger: logging.Logger) -> None:
    """Apply ``AMCT_LOG_LEVEL`` and ``AMCT_LOG_FILE_LEVEL`` to the handlers of ``logger``."""
    for handler in logger.handlers:
        if handler.get_name() == "amct_console":
            handler.setLevel(_level_from_env("AMCT_LOG_LEVEL"))
        elif handler.get_name() == "amct_file":
            handler.setLevel(_level_from_env("AMCT_LOG_FILE_LEVEL"))
