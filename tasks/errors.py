"""Errors that carry where the problem is (file, line, key) so the CLI prints one clear line."""
from __future__ import annotations

from typing import Optional


class PipelineError(RuntimeError):
    """Fatal input or environment problem; the run is marked FAILED and nothing is registered."""


class DataError(PipelineError):
    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        self.path, self.line = path, line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


class ContractError(PipelineError):
    """A data contract (GX suite or threshold) failed; raised before any training."""


class ModelLoadError(PipelineError):
    pass
