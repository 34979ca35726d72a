"""The one exception type koala raises for bad user input; the CLI prints it without a traceback."""


class KoalaError(Exception):
    """A problem with the user's input or files, with a message that says what to fix."""
