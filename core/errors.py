"""The root of the errors this project raises on purpose.

Each says what went wrong in one line that names the thing at fault (a setting, a
file and line, a topic, a record, a window). The program that meets one decides
what it means: a setting or input the user must fix is exit 2, anything else a
crash (exit 1, nothing committed after it). An exception that is *not* a
`PipelineError` is a bug or the client library's own, and is reported as such.
"""


class PipelineError(Exception):
    """Raised on purpose by this project's code, with a message meant for an operator."""
