"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a path. Message names the culprit and the problem."""

    exit_code = 2


class ConfigError(UserError):
    """Unknown key, wrong type or bad value in a config file or a --set override."""


class DataError(UserError):
    """A scan or datalist that cannot be used: missing, corrupt, truncated, wrong dimensions, NaN voxels."""


def closest(name: str, options) -> str | None:
    """The valid option a mistyped `name` most likely meant: a close spelling, else one it is a prefix of."""
    import difflib

    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=1)
    if close:
        return close[0]
    starts = [o for o in options if o.startswith(str(name)) or str(name).startswith(o)]
    return starts[0] if starts else None


def user_error_in(error: BaseException, depth: int = 8) -> "UserError | None":
    """The UserError inside an exception chain (MONAI wraps a transform's DataError in RuntimeError), or None."""
    seen = error
    while seen is not None and depth:
        if isinstance(seen, UserError):
            return seen
        seen, depth = seen.__cause__ or seen.__context__, depth - 1
    return None
