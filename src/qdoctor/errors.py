"""One exception type for every error a user can cause.

The CLI prints ``QDoctorError`` messages as a single line and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class QDoctorError(Exception):
    """A user-facing error: bad input, unsupported model, impossible request."""
