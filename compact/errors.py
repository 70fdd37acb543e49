"""The one exception type that means "the user gave something wrong".

The CLI turns it into exit status 2 with one line on stderr; the app into gr.Error.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one line."""


class Cancelled(Exception):
    """A long job stopped because should_stop() said so: the one cancellation signal.

    `result` holds what the job had when it stopped (for a training run: its step and the
    checkpoint to resume from), or None when there is nothing to keep.
    """

    def __init__(self, message: str = "cancelled", result: dict | None = None):
        super().__init__(message)
        self.result = result
