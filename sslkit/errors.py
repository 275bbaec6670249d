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


def exception_chain(error: BaseException | None, depth: int = 8) -> list[BaseException]:
    """error, its cause (or context), that one's, ... (at most `depth`)."""
    chain = []
    while error is not None and len(chain) < depth:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def user_error_in(error: BaseException, depth: int = 8) -> "UserError | None":
    """The UserError inside an exception chain (MONAI wraps a transform's DataError in RuntimeError), or None."""
    return next((e for e in exception_chain(error, depth) if isinstance(e, UserError)), None)


def disk_full_in(error: BaseException | None) -> BaseException | None:
    """The exception of the chain that says the disk is full, however the writer says it: OSError(ENOSPC), or
    safetensors' / torch's own errors that only name it in their message; None when none does."""
    import errno

    return next((e for e in exception_chain(error) if (isinstance(e, OSError) and e.errno == errno.ENOSPC)
                 or "No space left on device" in str(e) or "os error 28" in str(e)), None)
