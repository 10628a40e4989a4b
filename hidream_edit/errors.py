"""Errors that mean "the user asked for something that cannot be done", shown as one line."""


class UserError(Exception):
    """A mistake in the user's input or environment; entry scripts print it as one line and exit 2."""


class ModelFilesError(UserError):
    """A model directory or checkpoint file is missing, incomplete or corrupt.

    `role` ("llama", "i1" or "edit") says which model source is at fault, so a front end that knows
    its flags can name the one that sets it.
    """

    def __init__(self, message: str, role: str | None = None) -> None:
        super().__init__(message)
        self.role = role


class ImageInputError(UserError):
    """An input image cannot be opened or is outside the accepted limits."""
