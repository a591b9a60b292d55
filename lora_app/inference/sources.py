"""Where adapters come from: a run's adapter folder, an uploaded folder, or a .zip.

Zips come from strangers (uploads), so extraction is defensive: every member is checked before
anything is written — no absolute paths, no ``..``, no links, no device files, a cap on the unpacked
size — and the result is written to a temporary folder renamed into place. Extractions are kept under
a folder named after the zip's content hash, so the same upload is unpacked once and an adapter
evicted from the RAM cache can be reloaded from it later.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from lora_app.errors import InferenceError
from lora_app.lora.io import CONFIG_NAME, WEIGHTS_NAME

MAX_UNZIPPED_BYTES = 4 * 2**30  # an adapter is megabytes; anything near this is a zip bomb


def find_adapter_folder(path: str | os.PathLike) -> Path:
    """The folder that holds ``adapter_config.json``: ``path`` itself or, for a run folder, the one
    folder below it (two levels at most, checkpoints skipped) that does."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InferenceError(f"adapter {path} does not exist.")
    if not path.is_dir():
        raise InferenceError(f"adapter {path} is a file; give its folder or a .zip.")
    if (path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists():
        return path  # read_adapter will name what is missing
    found = sorted(p.parent for p in [*path.glob(f"*/{CONFIG_NAME}"), *path.glob(f"*/*/{CONFIG_NAME}")]
                   if not any(part.startswith("checkpoint") for part in p.relative_to(path).parts))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise InferenceError(f"{path} holds several adapters ({names}); pick one of those folders.")
    raise InferenceError(f"{path} holds no adapter ({CONFIG_NAME} + {WEIGHTS_NAME}).")


def fingerprint(folder: Path) -> tuple:
    """Changes when the adapter files are rewritten (e.g. a run saved a newer final adapter)."""
    stats = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (folder / name).stat()
            stats.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


def adapter_name_for(folder: Path) -> str:
    """A readable adapter name from its folder: the run's name when the folder is a generic
    ``adapter``/``final`` inside a run, with characters the LoRA core refuses ('.') replaced."""
    parts = [p for p in (folder.name, folder.parent.name) if p]
    generic = {"adapter", "final", "final_adapter", "lora", "model"}
    name = parts[1] if parts and parts[0].lower() in generic and len(parts) > 1 else (parts[0] if parts else "")
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")
    return name or "adapter"


def resolve_source(source: str | os.PathLike, unzip_root: Path) -> Path:
    """The adapter folder for a folder or a .zip (extracted under ``unzip_root`` if needed)."""
    path = Path(source).expanduser()
    if path.is_file() and (path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)):
        return find_adapter_folder(extract_zip(path, unzip_root))
    return find_adapter_folder(path)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and re.match(r"^[A-Za-z]:", parts[0])):
        return "an absolute path"
    if ".." in parts:
        return "a '..' path that points outside the folder"
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip was written without Unix modes
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "a link or special file"
    return None


def extract_zip(zip_path: Path, unzip_root: Path, max_bytes: int = MAX_UNZIPPED_BYTES) -> Path:
    """Unpack ``zip_path`` safely; returns the folder it was unpacked to (reused when done before)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InferenceError(f"{zip_path.name} is not a readable zip file: {err}") from err
    with archive:
        members = archive.infolist()
        for info in members:
            problem = _member_problem(info)
            if problem:
                raise InferenceError(f"{zip_path.name} was refused: entry {info.filename!r} is {problem}.")
        if sum(info.file_size for info in members) > max_bytes:
            raise InferenceError(f"{zip_path.name} unpacks to more than {max_bytes // 2**20} MiB; "
                                 "an adapter is far smaller, so it was refused.")
        digest = hashlib.sha256()
        with open(zip_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        # <hash>/<zip name>/: one extraction per content, and the adapter is named after the zip
        target = unzip_root / digest.hexdigest()[:16] / adapter_name_for(Path(zip_path.stem))
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unzip-", dir=unzip_root))
        try:
            for info in members:
                out = tmp.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # else another session unpacked the same zip meanwhile
                    raise
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise InferenceError(f"{zip_path.name} could not be unpacked: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
