"""User-facing errors.

Every failure a user can cause (a bad path, a broken checkpoint, a bad setting) is raised as a
``DGemmaError`` whose message is one line naming the problem. The CLI prints it and exits non-zero;
library callers can catch it.
"""


class DGemmaError(Exception):
    """A problem with the user's input, reported as one clear line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
