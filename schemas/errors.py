"""The one user-facing exception type.

Every error a user can cause (bad recipe, bad input file, unreachable bucket) is raised as a
`MatesError` with a one-line message worded one way: the argument in backticks, the constraint,
the value seen, and the fix or the allowed values. The CLI prints the message alone and exits 2.
"""


class MatesError(Exception):
    """A user-facing error whose message is a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
