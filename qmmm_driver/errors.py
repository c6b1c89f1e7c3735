"""Error types for input a user can fix (their messages name the file, atom or value), and config reading."""


class InputError(ValueError):
    """Bad input (file, selection, model, cell, socket address): the message says what to fix."""


def read_toml(path, missing: str) -> dict:
    """The TOML file ``path`` as a dict; ``missing`` is the message when it does not exist."""
    import tomllib
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(missing)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path} is not valid TOML: {err}") from err
