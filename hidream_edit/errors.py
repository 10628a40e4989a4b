"""Errors that mean "the user asked for something that cannot be done", shown as one line.

Messages are written in words, without flag names: the web UI shows them to people who have no flags.
`fix` names the remedy symbolically; a front end that knows its flags turns it into a hint
(config.CLI_FIXES for the command lines).
"""


def first_line(exc: BaseException) -> str:
    """An error quoted inside a one-line message: its first line, at most 200 characters (its type if empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class UserError(Exception):
    """A mistake in the user's input or environment; entry scripts print it as one line and exit 2."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class ModelFilesError(UserError):
    """A model directory or checkpoint file is missing, incomplete or corrupt.

    `role` ("llama", "i1" or "edit") says which model source is at fault, so a front end that knows
    its flags can name the one that sets it.
    """

    def __init__(self, message: str, role: str | None = None) -> None:
        super().__init__(message, fix=f"source_{role}" if role else None)
        self.role = role


class ImageInputError(UserError):
    """An input image cannot be opened or is outside the accepted limits."""


class NonFiniteError(UserError):
    """An edit produced NaN/inf (fp16 overflow, typically); nothing is saved and another dtype fixes it."""

    REMEDIES = {
        "fp16": "bf16 (where the device supports it) or fp32 avoids the overflow",
        "bf16": "fp32 avoids it",
    }

    def __init__(self, where: str, dtype: str) -> None:
        remedy = self.REMEDIES.get(dtype, "check the model files and the input image")
        super().__init__(f"{where} produced NaN/inf in {dtype}; nothing was saved; {remedy}", fix=f"dtype_{dtype}")


class EditCancelled(Exception):
    """Raised between denoising steps when the caller asked to stop; nothing is saved."""


class GuidanceGroupError(Exception):
    """Ranks working together lost each other: a rank of a guidance group failed, died or timed out, or
    the rendezvous store every rank shares went away (torchrun's agent killed).

    Not the user's input at fault, so front ends print it as one line and exit 1; nothing was saved.
    """

    @classmethod
    def store_lost(cls, rank: int, detail: str, where: str | None = None) -> "GuidanceGroupError":
        at = f" at {where}" if where else ""
        return cls(f"rank {rank} lost the rendezvous store{at} (torchrun's agent or rank 0 ended): {detail}")


class GroupPeerFailed(Exception):
    """Raised on a rank that learns, mid-step, that another rank of its guidance group failed.

    The failing rank's own flag in the step's gather names it; this rank only leaves its share early.
    """
