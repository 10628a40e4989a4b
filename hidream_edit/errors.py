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


class NonFiniteError(UserError):
    """An edit produced NaN/inf (fp16 overflow, typically); nothing is saved and another dtype fixes it."""

    FIXES = {
        "fp16": "rerun with --dtype bf16 where the device supports it, else --dtype fp32",
        "bf16": "rerun with --dtype fp32",
    }

    def __init__(self, where: str, dtype: str) -> None:
        fix = self.FIXES.get(dtype, "check the model files and the input image")
        super().__init__(f"{where} produced NaN/inf in {dtype}; nothing was saved; {fix}")
