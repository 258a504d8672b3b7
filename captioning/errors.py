"""The one exception type for user mistakes.

The CLI turns a ``UserError`` into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a path, a config key, a file's content. The message names it."""
