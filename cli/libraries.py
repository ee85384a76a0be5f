"""Quieting the heavy libraries (diffusers, transformers) that training and generation load."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' chatter (their own progress bars, fallback and deprecation
    notices) off the terminal; lorareg shows its own progress. ``--debug`` (LORAREG_DEBUG) leaves it on.

    Call before they are imported: some notices are printed at import.
    """
    if os.environ.get("LORAREG_DEBUG") not in (None, "", "0"):
        return
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|diffusers|transformers|peft|accelerate)\.")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
