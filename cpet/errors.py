"""One exception type for problems the user can fix; the CLI prints it as one line."""


class CpetError(Exception):
    """Bad input or missing resources: the message names the problem and the fix."""
