"""Errors that carry where the problem is (file, line, key) so the CLI prints one clear line."""

from __future__ import annotations

from typing import Optional

from ftflow.tasks.secrets import redact_args, redact_text


class PipelineError(RuntimeError):
    """Fatal input or environment problem; the run is marked FAILED and nothing is registered.

    The message is redacted when the error is made: Prefect stores it as the state message, logs it and
    persists the exception, and the CLI prints it, so a credential in it would leak in four places.
    """

    def __init__(self, *args):
        super().__init__(*redact_args(args))


class DataError(PipelineError):
    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        self.path, self.line = (redact_text(str(path)) if path else path), line
        where = f"{self.path}:{line}: " if path and line else (f"{self.path}: " if path else "")
        super().__init__(f"{where}{message}")


class ContractError(PipelineError):
    """A data contract (GX suite or threshold) failed; raised before any training."""


class ModelLoadError(PipelineError):
    """The model or tokenizer files are missing, unreadable or refused by policy; retrying cannot help."""
