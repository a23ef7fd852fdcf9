"""The one exception type that means "the user's input is wrong".

The CLI turns a PlanerError into a single line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Library code raises it wherever a file, a config value or an architecture is at fault.
"""


class PlanerError(Exception):
    pass
