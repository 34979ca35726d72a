"""The one exception type koala raises for bad user input; the CLI prints it without a traceback."""


class KoalaError(Exception):
    """A problem with the user's input or files, with a message that says what to fix.

    Library code speaks in library terms; ``option`` names the setting at fault (e.g. ``"overwrite"``) so a
    front end can point at its own spelling of it (the CLI adds ``--overwrite``).
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option
