"""The one error type the inference layer raises for bad input.

Everything a user can get wrong (an empty prompt, an adapter for another base model, a corrupt or
unsafe file, an unknown adapter name, a mode the base cannot do) becomes an ``InferenceError`` whose
message is meant to be shown as it is: the UI prints it in the page, the CLI on stderr with exit code 2.
It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
"""


class InferenceError(ValueError):
    """A request the inference layer refuses; the message says why in plain words."""
