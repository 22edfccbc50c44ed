"""Run I/O paths: local folders and `gs://` buckets through one API (etils `epath`, as orbax).

    from sdjax import paths
    metrics = paths.resolve(workdir) / "metrics.jsonl"   # workdir: "/x/run" or "gs://b/run"
    paths.write_text(metrics, text)   # atomic: readers see the old file or the new one, whole

Local paths are made absolute. `gs://` goes through gcsfs (the `gcs` extra) for files and
through tensorstore for orbax's arrays. Listings are never cached: another host's writes
(a manifest, a checkpoint step) are seen at once.

Emulators: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (Google's variable, read by gcsfs
and google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` with the same URL are the only
switches. When only the first is set the second follows it; two different URLs are refused
(a checkpoint's arrays and its metadata would land on two servers).

Formats whose readers need a local file (ArrayRecord shards) use `local_copy` (a cache
under `$SDJAX_CACHE`, default `~/.cache/sdjax`) and `upload`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid

from etils import epath

from sdjax.errors import UserError

REMOTE_SCHEMES = ("gs://",)
EMULATOR = "STORAGE_EMULATOR_HOST"
TENSORSTORE_URL = "TENSORSTORE_GCS_HTTP_URL"


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def configure_gcs() -> None:
    """Point every GCS client at the same server (see the module docstring); idempotent."""
    emulator = os.environ.get(EMULATOR)
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        tensorstore = os.environ.setdefault(TENSORSTORE_URL, url)
        if tensorstore.rstrip("/") != url.rstrip("/"):
            raise UserError(
                f"{EMULATOR}={emulator} but {TENSORSTORE_URL}={tensorstore}: "
                "both must name the same storage server"
            )
        # gcsfs's hierarchical-namespace probe calls a gRPC control plane no emulator has
        # (a warning and a retry on every call); must be set before gcsfs is imported.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import fsspec.config
        import gcsfs  # noqa: F401
    except ImportError:
        raise UserError("gs:// paths need gcsfs: pip install 'sdjax[gcs]'") from None
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def resolve(path) -> epath.Path:
    """An `epath.Path` for a local path (made absolute) or a `gs://` URL."""
    text = os.fspath(path)
    if is_remote(text):
        configure_gcs()
        return epath.Path(text)
    if "://" in text:
        raise UserError(f"unsupported path {text} (local paths and gs:// only)")
    return epath.Path(os.path.abspath(text))


def join(path, *parts: str) -> str:
    return str(resolve(path).joinpath(*parts))


def exists(path) -> bool:
    return resolve(path).exists()


def isdir(path) -> bool:
    return resolve(path).is_dir()


def makedirs(path) -> epath.Path:
    p = resolve(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def listdir(path) -> list[str]:
    """Names in a folder (empty when it does not exist)."""
    p = resolve(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def read_text(path) -> str:
    return resolve(path).read_text()


def read_bytes(path) -> bytes:
    return resolve(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
    """Atomic write: a GCS object appears whole; a local file is renamed into place."""
    p = resolve(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def remove(path) -> None:
    p = resolve(path)
    if p.exists():
        p.unlink()


def size(path) -> int:
    return resolve(path).stat().length


def cache_dir() -> str:
    return os.environ.get("SDJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdjax")


def local_copy(path, expected_size: int | None = None) -> str:
    """A local file with the content of `path`: itself when local, else a cached download
    (fetched again when its size differs from `expected_size`). Safe for several processes
    at once: each download lands under a unique name and is renamed into place."""
    if not is_remote(path):
        return str(resolve(path))
    url = str(resolve(path))
    digest = hashlib.sha256(os.path.dirname(url).encode()).hexdigest()[:16]
    local = os.path.join(cache_dir(), "remote", digest, os.path.basename(url))
    if os.path.isfile(local) and (expected_size is None or os.path.getsize(local) == expected_size):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.{uuid.uuid4().hex}.part"
    try:
        with resolve(url).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


def upload(local: str, path) -> None:
    """Copy the local file `local` to `path` (local or remote)."""
    dest = resolve(path)
    if not is_remote(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.part"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    with open(local, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def upload_tree(local_dir: str, path) -> None:
    """Copy a local folder's files under `path`, keeping their relative paths."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            upload(os.path.join(root, name), resolve(path) / rel)


def download_tree(path, local_dir: str) -> None:
    """Copy every file under `path` (local or remote) into `local_dir`."""
    for item in resolve(path).iterdir():
        target = os.path.join(local_dir, item.name)
        if item.is_dir():
            download_tree(item, target)
            continue
        os.makedirs(local_dir, exist_ok=True)
        with item.open("rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)


def staging_dir(prefix: str = "sdjax-") -> tempfile.TemporaryDirectory:
    """A local scratch folder for writers whose format needs local files."""
    return tempfile.TemporaryDirectory(prefix=prefix)
