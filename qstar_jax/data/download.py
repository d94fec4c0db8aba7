"""Data files with a public URL and a sha256: found locally, else downloaded into the cache.

Where a file comes from (:func:`locate_or_download`), in order:

1. ``data_dir()/<relative path>`` (setting ``QSTAR_DATA_DIR``; default the ``shared/data`` folder
   next to the repository), e.g. ``gsm8k/test.jsonl``;
2. ``cache_dir()/<relative path>`` (setting ``QSTAR_CACHE_DIR``; default ``~/.cache/qstar_jax``),
   a copy downloaded earlier;
3. a download from ``<base URL>/<file name>`` into the cache. The base URL of each data set is a
   setting, so a mirror or a local server can stand in for the public one:

   - ``QSTAR_GSM8K_URL`` (GSM8K ``train.jsonl`` / ``test.jsonl``), default
     ``https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data``;
   - ``QSTAR_SHAKESPEARE_URL`` (tiny Shakespeare ``input.txt``), default
     ``https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare``.

A download is atomic: the bytes go to a temporary file in the cache folder, its sha256 is
checked (:func:`verify_file`, the one checksum check of the package, also used by the loaders on
local files), and only then is it renamed over the cache entry. A corrupted download raises
:class:`DataChecksumError` (the file, both digests, the URL) and leaves the previous cache entry
as it was. An unreachable URL (no network, refused connection, timeout, HTTP error) raises one
:class:`DataUnavailableError` naming ``QSTAR_DATA_DIR``, the missing path, the URL and its setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

import tqdm

from qstar_jax.data.paths import cache_dir, data_dir

__all__ = [
  "DOWNLOAD_TIMEOUT_S",
  "DataChecksumError",
  "DataUnavailableError",
  "RemoteFile",
  "download_file",
  "locate_or_download",
  "require_file",
  "resolve_file",
  "sha256_file",
  "verify_file",
]

DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DataChecksumError(ValueError):
  """A data file's sha256 differs from the published one."""


class DataUnavailableError(FileNotFoundError):
  """A data file is in neither the data folder nor the cache, and could not be downloaded."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """A data file of known content: where it lives locally and where to download it.

  Attributes:
    name: what the file is, for messages (``"GSM8K test"``).
    relative_path: its path under ``data_dir()`` and ``cache_dir()`` (``"gsm8k/test.jsonl"``).
    sha256: hex digest of the expected bytes.
    url_setting: environment variable holding the base URL (``"QSTAR_GSM8K_URL"``).
    default_base_url: the public folder URL used when the setting is unset.
    description: what the expected content is (``"grade-school-math test.jsonl, 1,319
      problems"``), for the checksum message.
  """

  name: str
  relative_path: str
  sha256: str
  url_setting: str
  default_base_url: str
  description: str

  def base_url(self) -> str:
    """The setting ``url_setting`` when set, else ``default_base_url`` (no trailing slash)."""
    return (os.environ.get(self.url_setting) or self.default_base_url).rstrip("/")

  def url(self) -> str:
    """``<base URL>/<file name>``."""
    return f"{self.base_url()}/{pathlib.PurePosixPath(self.relative_path).name}"

  def local_path(self) -> pathlib.Path:
    """``data_dir()/relative_path`` (may not exist)."""
    return data_dir() / self.relative_path

  def cache_path(self) -> pathlib.Path:
    """``cache_dir()/relative_path`` (may not exist)."""
    return cache_dir() / self.relative_path


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_file(path: str | os.PathLike, remote: RemoteFile, *, url: str | None = None) -> None:
  """Raises DataChecksumError naming the file, both digests (and ``url``) on a sha256 mismatch.

  ``url``: where the bytes at ``path`` were just downloaded from, when they were.
  """
  got = sha256_file(path)
  if got != remote.sha256:
    source = f" (downloaded from {url})" if url is not None else ""
    raise DataChecksumError(
      f"{remote.name} file {path}{source} has sha256 {got}, expected {remote.sha256} "
      f"(the published {remote.description}); the file is corrupted or a different version"
    )


def require_file(path: str | os.PathLike, remote: RemoteFile) -> pathlib.Path:
  """``path`` as a Path; FileNotFoundError naming it, QSTAR_DATA_DIR and the URL if it is absent."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"{remote.name} file {path} not found; set QSTAR_DATA_DIR to a folder holding "
      f"{remote.relative_path} (download: {remote.url()})"
    )
  return path


def download_file(remote: RemoteFile, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
  """Downloads ``remote.url()`` to ``remote.cache_path()``, replacing it only once verified.

  Returns the cache path. Raises DataChecksumError (the previous cache entry unchanged) or
  DataUnavailableError (the URL could not be read within ``timeout`` seconds).
  """
  url = remote.url()
  dest = remote.cache_path()
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  tmp = pathlib.Path(tmp_name)
  try:
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        # disable=None: a progress bar on a terminal only, none in logs and tests.
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url}",
                       disable=None, leave=False) as bar:
          for chunk in iter(lambda: response.read(_CHUNK), b""):
            out.write(chunk)
            bar.update(len(chunk))
    # Refused or unreachable (URLError), HTTP status (HTTPError), timeout or reset (OSError),
    # connection cut mid-body (HTTPException).
    except (OSError, http.client.HTTPException) as err:
      reason = err.reason if type(err) is urllib.error.URLError else err
      raise DataUnavailableError(
        f"{remote.name} file {remote.relative_path} is not in QSTAR_DATA_DIR "
        f"({remote.local_path()}) nor in the cache ({dest}), and downloading it from {url} "
        f"failed: {reason}. Set QSTAR_DATA_DIR to a folder holding {remote.relative_path}, or "
        f"{remote.url_setting} to a reachable base URL (now {remote.base_url()})."
      ) from err
    verify_file(tmp, remote, url=url)
    os.replace(tmp, dest)
  finally:
    tmp.unlink(missing_ok=True)
  return dest


def locate_or_download(remote: RemoteFile, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
  """The data folder's copy, else the cache's, else a fresh verified download into the cache."""
  for path in (remote.local_path(), remote.cache_path()):
    if path.is_file():
      return path
  return download_file(remote, timeout=timeout)


def resolve_file(
  remote: RemoteFile, path: str | os.PathLike | None = None, *, verify: bool = True
) -> pathlib.Path:
  """The file a loader reads: ``path`` when given (it must exist), else
  :func:`locate_or_download`; its sha256 checked unless ``verify=False``."""
  path = locate_or_download(remote) if path is None else require_file(path, remote)
  if verify:
    verify_file(path, remote)
  return path
