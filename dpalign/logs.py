"""Quieter third-party libraries for command-line runs (imports its libraries only when called)."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """dp-accounting's RDP search logs every non-converging order at WARNING; our callers get the number."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise prints its CPU fallback on stdout (breaks --json)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
