"""Errors that mean "the user asked for something that cannot be done", shown as one line."""


class UserError(Exception):
    """A mistake in the user's input or environment; entry scripts print it as one line and exit 2."""


class ModelFilesError(UserError):
    """A model directory or checkpoint file is missing, incomplete or corrupt."""


class ImageInputError(UserError):
    """An input image cannot be opened or is outside the accepted limits."""
