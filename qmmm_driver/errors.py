"""Error types for input a user can fix; their messages name the file, atom or value."""


class InputError(ValueError):
    """Bad input (file, selection, model, cell, socket address): the message says what to fix."""
