"""Exceptions with messages a radiographer or an engineer can act on; the CLI maps them to exit codes."""


class MRAnnotatorError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(MRAnnotatorError):
    """The image given is missing, unreadable, not MR, not 3D, or has unusable geometry."""

    exit_code = 2


class WeightsError(MRAnnotatorError):
    """Model weights are missing, incomplete or do not match the label catalogue."""

    exit_code = 3


class OutputError(MRAnnotatorError):
    """The output folder cannot be created or written, or something is in the way of a result file."""

    exit_code = 2
