"""Where DRAM weight images live, who may read them, and how long they stay.

Images hold a model's weights, so they are private to the user who runs the server:

- the root is ``$FLOWSERVE_SHM_DIR``, else ``/dev/shm/flowserve-<uid>`` (else the cache
  directory where there is no ``/dev/shm``), a directory of mode 0700 that must be owned by
  this user: one that another user made (or a symlink) is refused, never used;
- each server has its own session directory in it, ``server-<pid>``, opened by the first
  process that needs one (the server, through the ``spmd`` executor's startup hook) and named
  to its children through ``$FLOWSERVE_IMAGE_SESSION``. The server holds an exclusive lock on
  its ``.alive`` file while it runs, and removes the whole directory when it exits cleanly;
- a session whose ``.alive`` lock can be taken belongs to a server that died (SIGKILL, a
  crash): the next session opened in the same root removes it. A session without an
  ``.alive`` file is removed once it is a minute old. Children never make a session: an
  image built after its server exited would stay behind.

Files are created 0600. An image's index records its size and SHA-256, checked before every
mapping (``verify``): an image that does not match is removed and built again.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from flowserve_core.errors import ConfigError

log = logging.getLogger(__name__)

SESSION_VARIABLE = "FLOWSERVE_IMAGE_SESSION"
#: Seconds after which a session directory without an ``.alive`` file is taken for abandoned
#: (only one being made right now lacks it).
ORPHAN_AGE = 60.0
_ALIVE = ".alive"
_held: dict[Path, int] = {}  # session directory → the fd of its locked .alive file


def image_root() -> Path:
    """The private root of this user's images (made if missing; see the module doc)."""
    from flowserve_spmd_executor.options import cache_root

    if os.environ.get("FLOWSERVE_SHM_DIR"):
        root = Path(os.environ["FLOWSERVE_SHM_DIR"])
    elif Path("/dev/shm").is_dir():
        root = Path(f"/dev/shm/flowserve-{os.getuid()}")
    else:
        root = cache_root() / "images"
    return private_dir(root)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can open: made 0700 if missing; an existing one
    must be a real directory owned by this user (its mode is then tightened to 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the DRAM image directory {path} is not a directory (a symlink?); refusing to use it")
    if info.st_uid != os.getuid():
        raise ConfigError(f"the DRAM image directory {path} belongs to uid {info.st_uid}, not to this user "
                          f"({os.getuid()}); refusing to use it (remove it, or set FLOWSERVE_SHM_DIR)")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def image_dir() -> Path:
    """This server's session directory, where its images are built and mapped. A child never
    makes its server's session: once the server has removed it (it exited), an image built
    after it would stay behind, so that is an error."""
    root = image_root()
    name = os.environ.get(SESSION_VARIABLE)
    if not name or name == f"server-{os.getpid()}":
        return open_session(root)
    session = root / name
    if not session.is_dir():
        raise ConfigError(f"the DRAM image session {session} is gone (its server exited)")
    return private_dir(session)


def open_session(root: Path | None = None) -> Path:
    """Open this process's session in ``root`` (idempotent): make it, lock its ``.alive``, name it
    to children, remove it at exit, and remove the sessions of servers that died."""
    root = root or image_root()
    session = root / f"server-{os.getpid()}"
    if session in _held:
        return session
    collect(root)
    private_dir(session)
    fd = os.open(session / _ALIVE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held[session] = fd
    os.environ[SESSION_VARIABLE] = session.name
    atexit.register(_remove_session, session, os.getpid())
    return session


def _remove_session(session: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that happens to exit normally
        shutil.rmtree(session, ignore_errors=True)


def collect(root: Path) -> list[Path]:
    """Remove the sessions in ``root`` whose server is gone; the ones removed."""
    removed = []
    for session in sorted(root.glob("server-*")):
        if session in _held or not session.is_dir() or session.is_symlink():
            continue
        try:
            fd = os.open(session / _ALIVE, os.O_RDWR)
        except FileNotFoundError:
            if time.time() - session.stat().st_mtime < ORPHAN_AGE:
                continue  # being made right now, or a child's: the age rule decides
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its server lives
            finally:
                os.close(fd)
        shutil.rmtree(session, ignore_errors=True)
        log.info("removed the DRAM images of a server that is gone: %s", session, extra={"session": str(session)})
        removed.append(session)
    return removed


def create_private(path: Path) -> int:
    """Open ``path`` for writing, made with mode 0600 (never following a symlink)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)


def digest(path: Path) -> str:
    """The SHA-256 of the file at ``path``, hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify(data: Path, nbytes: int, sha256: str) -> str:
    """'' if the image file ``data`` has the size and SHA-256 its index recorded, else why not."""
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return "its data file is missing"
    if size != nbytes:
        return f"it has {size} bytes, its index says {nbytes}"
    if digest(data) != sha256:
        return "its content does not match the SHA-256 recorded when it was built"
    return ""
