"""The one base class of every user-facing mechdiff error.

A :class:`MechdiffError` means "the input is wrong, here is what to change": stage scripts print its
message as one line and exit with status 2, never with a traceback.
"""


class MechdiffError(Exception):
    """A problem the user can fix; the message names the problem, where it is, and the fix."""
