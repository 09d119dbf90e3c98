"""Where a run's files live: a local directory, or any URI a pyarrow filesystem understands.

``run_dir`` as a plain path or ``file://`` URI is *local*: everything is written in place.
Any other URI (``s3://``, ``gs://``, ``hdfs://``, ``abfs://`` ...) is *remote*: the driver and
actors write into a local staging directory (``local_dir``) and this module copies what they
wrote to the URI. A checkpoint is published marker-last (:meth:`RunStorage.commit_dir`), so a
reader of the URI never sees a ``COMPLETE`` marker without the files it vouches for; remote
directories without the marker (an upload cut short) are ignored and cleared.
"""
from __future__ import annotations

import logging
import posixpath
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from pyarrow import fs as pafs
from tqdm import tqdm

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
DEFAULT_STAGING = Path("~/.cache/rayalign/staging")


class StorageError(RuntimeError):
    """A filesystem operation on the run's URI failed; the message names the URI."""


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _remove_local(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class RunStorage:
    """The run dir: ``local_dir`` is where to write; methods take paths relative to the run.
    ``progress`` (set by the driver where a bar can show) puts a bar on uploads."""

    progress = False

    def __init__(self, run_dir: str, staging_root: str | Path | None = None,
                 filesystem: pafs.FileSystem | None = None, base_path: str | None = None):
        """``filesystem``/``base_path`` bypass URI resolution (tests, custom filesystems)."""
        self.uri = str(run_dir)
        self.remote = "://" in self.uri and not self.uri.startswith("file://")
        self._local_fs = pafs.LocalFileSystem()
        if not self.remote:
            path = self.uri if "://" not in self.uri else self._open()[1]
            self.local_dir = Path(path).expanduser().absolute()
            self.fs, self.base = self._local_fs, self.local_dir.as_posix()
            return
        if filesystem is None:
            filesystem, base_path = self._open()
        self.fs = filesystem
        if base_path is None:
            base_path = self.uri.split("://", 1)[1]
        self.base = base_path.rstrip("/")
        root = Path(staging_root) if staging_root is not None else DEFAULT_STAGING
        self.local_dir = root.expanduser().absolute() / re.sub(r"[^A-Za-z0-9._-]+", "_", self.uri)

    def _open(self) -> tuple[pafs.FileSystem, str]:
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as e:  # ArrowInvalid (scheme), OSError (credentials, network)
            raise StorageError(f"pyarrow could not open {self.uri}: {e}; check the URI or the "
                               "filesystem's credentials") from e

    @contextmanager
    def _errors(self, what: str, rel: str):
        try:
            yield
        except Exception as e:
            raise StorageError(f"{what} {rel!r} at {self.uri} failed: {e}; check the URI, the "
                               "filesystem's credentials and free space") from e

    def _remote(self, *parts: str) -> str:
        return posixpath.join(self.base, *(p for p in parts if p not in ("", ".")))

    # ---- plain file operations (on the URI; on local_dir in local mode) -----------------------
    def exists(self, rel: str) -> bool:
        with self._errors("checking", rel):
            return self.fs.get_file_info(self._remote(rel)).type != pafs.FileType.NotFound

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the subdirectories of ``rel``, in natural order (step-9 before step-10)."""
        with self._errors("listing", rel):
            sel = pafs.FileSelector(self._remote(rel), allow_not_found=True)
            infos = self.fs.get_file_info(sel)
        names = (i.base_name for i in infos if i.type == pafs.FileType.Directory)
        return sorted(names, key=_natural)

    def delete(self, rel: str) -> None:
        with self._errors("deleting", rel):
            info = self.fs.get_file_info(self._remote(rel))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def write_text(self, rel: str, text: str) -> Path:
        path = self.local_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.upload(rel)
        return path

    # ---- copies between local_dir and the URI (no-ops in local mode) -------------------------
    def upload(self, rel: str, dest: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """Copy the file or tree ``local_dir/rel`` to ``dest`` (default ``rel``) on the URI,
        leaving out files named in ``skip``. Other files already under ``dest`` stay."""
        if not self.remote:
            return
        src = self.local_dir / rel
        if not src.exists():
            raise FileNotFoundError(f"nothing to upload to {self.uri}: {src} does not exist")
        files = [src] if src.is_file() else sorted(
            p for p in src.rglob("*") if p.is_file() and p.name not in skip)
        sizes = [f.stat().st_size for f in files]
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"upload {rel}",
                  disable=not self.progress or len(files) < 2, dynamic_ncols=True) as bar:
            for f, size in zip(files, sizes):
                self._put(f, self._remote(dest or rel, f.relative_to(src).as_posix()))
                bar.update(size)

    def _put(self, local: Path, remote: str) -> None:
        with self._errors("uploading", str(local)):
            self.fs.create_dir(posixpath.dirname(remote), recursive=True)
            pafs.copy_files(str(local), remote, source_filesystem=self._local_fs,
                            destination_filesystem=self.fs)

    def download(self, rel: str) -> Path:
        """Replace ``local_dir/rel`` with the file or tree ``rel`` from the URI; the copy lands
        in a temporary sibling first, so a cut-short download leaves no half-filled ``rel``."""
        dest = self.local_dir / rel
        if not self.remote:
            return dest
        tmp = dest.with_name(f".download-{dest.name}")
        _remove_local(tmp)
        _remove_local(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("downloading", rel):
            if self.fs.get_file_info(self._remote(rel)).type == pafs.FileType.Directory:
                tmp.mkdir()  # copy_files makes the subdirectories, not the top one
            pafs.copy_files(self._remote(rel), str(tmp), source_filesystem=self.fs,
                            destination_filesystem=self._local_fs)
        tmp.replace(dest)
        return dest

    # ---- marker-committed directories (checkpoints) -------------------------------------------
    def commit_dir(self, rel: str, marker: str = MARKER) -> None:
        """Upload ``rel`` with every file first and its ``marker`` last."""
        if not self.remote:
            return
        self.delete(posixpath.join(rel, marker))  # an overwritten dir is incomplete meanwhile
        self.upload(rel, skip=(marker,))
        self.upload(posixpath.join(rel, marker))
        log.info("uploaded %s to %s", rel, self.uri)

    def complete_dirs(self, rel: str, marker: str = MARKER) -> list[str]:
        """Subdirectories of ``rel`` holding ``marker``, oldest (natural order) first."""
        return [d for d in self.list_dirs(rel) if self.exists(posixpath.join(rel, d, marker))]

    def clear_partial(self, rel: str, marker: str = MARKER) -> None:
        done = set(self.complete_dirs(rel, marker))
        for d in self.list_dirs(rel):
            if d not in done:
                log.warning("removing half-uploaded %s/%s at %s", rel, d, self.uri)
                self.delete(posixpath.join(rel, d))

    def rotate(self, rel: str, keep: int, marker: str = MARKER) -> None:
        """Delete all but the newest ``keep`` complete subdirectories of ``rel``."""
        for d in self.complete_dirs(rel, marker)[:-keep] if keep > 0 else []:
            self.delete(posixpath.join(rel, d))

    def pull_latest(self, rel: str, marker: str = MARKER) -> Path | None:
        """Fetch the newest complete subdirectory of ``rel`` into ``local_dir`` (unless a
        complete copy is already there); its local path, or None when there is none."""
        done = self.complete_dirs(rel, marker)
        if not done:
            return None
        local = self.local_dir / rel / done[-1]
        if self.remote and not (local / marker).is_file():
            self.download(posixpath.join(rel, done[-1]))
        return local
