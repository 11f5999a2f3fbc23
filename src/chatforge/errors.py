"""Error types whose message is shown to the user as one line, without a traceback.

The CLI catches `ChatforgeError` and prints `error: <message>`; anything else is a bug and keeps
its traceback.
"""


class ChatforgeError(Exception):
    """A problem the user can fix: the message says what is wrong and where."""


class ConfigError(ChatforgeError):
    """An unknown key, a bad type or a bad value in a config file or a CLI override."""


class DataError(ChatforgeError):
    """A malformed record or file; the message starts with `FILE:LINE:` where it can."""
