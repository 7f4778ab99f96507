"""Write a file so that readers see the old content or the new one, never half of it."""
from __future__ import annotations

import os
import tempfile

#: Files the toolkit writes for the user: read/write for the owner, read for the group.
FILE_MODE = 0o640


def write_atomically(path: str | os.PathLike, payload: bytes, mode: int = FILE_MODE) -> str:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``.

    The folder is created if needed; on any failure the temporary file is removed and an
    existing ``path`` is left as it was. Returns ``path`` as given (a str).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
