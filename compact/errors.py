"""The one exception type that means "the user gave something wrong".

The CLI turns it into exit status 2 with one line on stderr; the app into gr.Error.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one line."""
