"""User-facing errors.

Anything a user can cause (a bad folder, a corrupt file, an unknown config key) raises
:class:`InputError` with one line that names the file or value and what is wrong. The CLI
prints that line and exits with status 2; no traceback.
"""


class InputError(ValueError):
    """A problem with the user's input: printed as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
