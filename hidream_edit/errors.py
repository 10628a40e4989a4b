"""Errors that mean "the user asked for something that cannot be done", shown as one line."""


class UserError(Exception):
    """A mistake in the user's input or environment; entry scripts print it as one line and exit 2."""


class ModelFilesError(UserError):
    """A model directory or checkpoint file is missing, incomplete or corrupt."""


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
