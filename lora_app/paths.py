"""Where the app keeps its files (``LORA_APP_HOME``, default ``~/.cache/lora_app``), and how it writes
them: atomically (a temporary file or folder renamed into place, so a reader or a crash never sees half
of one) and with the permissions a plain ``open()`` / ``mkdir()`` would give them (0644 / 0755 under
the usual umask). ``tempfile`` makes private 0600 / 0700 entries and safetensors writes 0600 files:
right for a secret, wrong for adapters, merged models, configs and zips that another user, a web
server or a container's user should be able to read. Nothing written here is a secret.
"""

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path


def app_home() -> Path:
    """The root folder for caches and runs; created on first use."""
    home = Path(os.environ.get("LORA_APP_HOME") or Path.home() / ".cache" / "lora_app")
    home.mkdir(parents=True, exist_ok=True)
    return home


def offline() -> bool:
    """Whether the Hugging Face Hub is off limits (``HF_HUB_OFFLINE`` set to 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def write_json(path: str | os.PathLike, values: dict) -> None:
    """Write ``values`` as JSON atomically: readers see the old file or the new one, never half of one."""
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(values, indent=2, default=str)))


def atomic_file(target: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_file)`` and move the result to ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _publish(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def atomic_folder(target: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_folder)`` and move the result to ``target`` in one rename (an existing
    ``target`` is replaced)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _publish(tmp)
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions that plain
    ``open()`` / ``mkdir()`` give new entries next to it."""
    file_mode, folder_mode = _fresh_modes(path.parent)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():  # chmod would follow it out of the folder
            os.chmod(entry, folder_mode if entry.is_dir() else file_mode)


def _fresh_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) of a new file and a new folder made in ``folder``: 0666 / 0777 less the
    umask, or what the folder's default ACL says. Making one of each is how to learn them without
    os.umask(), which reads the umask only by changing it, and a file another thread creates
    meanwhile would get the wrong permissions."""
    probe = folder / f".mode-probe-{uuid.uuid4().hex}"
    probe.mkdir()
    try:
        folder_mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()
    probe.touch(exist_ok=False)
    try:
        file_mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()
    return file_mode, folder_mode
