"""The one exception type for user mistakes; the CLI prints it as one line and exits 2."""


class ConveyorError(Exception):
    """A problem the user can fix (bad spec, missing file, invalid request); never a bug."""
