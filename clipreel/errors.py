"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class ClipreelError(Exception):
    """A problem the user can fix: the message names the file, the row and the fix."""
