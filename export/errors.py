"""Errors the export raises, each with a message that says what to fix.

ExportError
 ├── UsageError          exit 2: bad input, nothing written
 │    ├── InvalidSource  the model path or hub id is not a usable checkpoint
 │    ├── UnsupportedModel  a family or pooling Tandem cannot export
 │    └── OutputConflict the output folder would clobber the input or existing work
 └── ParityFailure       exit 1: the artifact misses the parity thresholds
"""

from __future__ import annotations


class ExportError(Exception):
    exit_code = 1


class UsageError(ExportError):
    exit_code = 2


class InvalidSource(UsageError):
    pass


class UnsupportedModel(UsageError):
    pass


class OutputConflict(UsageError):
    pass


class ParityFailure(ExportError):
    exit_code = 1
