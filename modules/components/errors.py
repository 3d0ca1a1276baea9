"""User-facing errors: each message names the problem and the fix, on one line."""


class VisionlabError(Exception):
    """Base class of errors the CLI reports as a one-line message with a non-zero exit code."""


class ConfigError(VisionlabError, ValueError):
    """A setting (path, model name, class count...) is wrong; the message says which and how to fix it."""


class DataError(VisionlabError):
    """A dataset or cache file is missing, empty or corrupt."""


class NonFiniteLossError(VisionlabError, FloatingPointError):
    """The training loss became NaN or infinite."""


class LostRankError(VisionlabError, RuntimeError):
    """Another process of a multi-process (DDP) run died or stopped responding; this one stops too."""
