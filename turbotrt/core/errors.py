"""The one family of expected failures: bad input, bad files, missing packages, unsupported targets.

Every error a user can cause or fix derives from `TurbotrtError`; its message names the problem
and the fix. The command line prints such errors as one line (exit code 1) and treats anything
else as a bug (see `turbotrt.cli`).
"""

from __future__ import annotations


class TurbotrtError(RuntimeError):
    """An expected failure with a message meant for the user."""


class BundleError(TurbotrtError):
    """A bundle that is missing, incomplete, tampered with, or built for another machine."""


class MissingDependencyError(TurbotrtError):
    """An optional package (torch, TensorRT, ray, ...) that this task needs is not installed."""


def require(module: str, purpose: str, install: str):
    """Import `module`, or raise a MissingDependencyError saying what needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{purpose} needs the `{module}` package ({e}); install it with: {install}") from None
