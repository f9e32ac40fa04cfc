"""The one exception type users see: a message that names the thing and the fix."""


class TunelabError(Exception):
    """A user-facing error; the CLI prints its message without a traceback (unless --debug)."""
