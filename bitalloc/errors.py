"""The one error type users see: it names the field at fault and what is allowed there."""


class BitallocError(Exception):
    """A user-facing error; the CLI prints `error: FIELD: MESSAGE` on one line and exits 2."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
