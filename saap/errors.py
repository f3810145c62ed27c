"""Exceptions raised for bad input; each message says what was wrong and the fix."""


class SaapError(Exception):
    """Base class of every error the project raises on purpose."""


class ParamsError(SaapError):
    """params.yaml (or a -S override) holds an invalid value or an unknown key."""


class SourceError(SaapError):
    """A model or dataset source cannot be parsed, found or fetched."""


class ChecksumError(SourceError):
    """A downloaded file does not match its pinned sha256."""


class PruningError(SaapError):
    """A pruning request cannot be carried out on this model."""


class DataError(SaapError):
    """Input data is missing, empty, malformed or too short."""


class ExportError(SaapError):
    """A model cannot be written in the requested export format."""


class LlamaCppError(SaapError):
    """llama.cpp cannot be built, or refused or crashed on a file."""
