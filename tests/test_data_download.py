"""Downloads on a machine with no data folder: a local HTTP server stands in for the public URLs.

Every test points QSTAR_DATA_DIR at an empty folder, QSTAR_CACHE_DIR at another, and the URL
settings at a server on 127.0.0.1 (or at a closed port): nothing reaches the internet.
"""

import contextlib
import functools
import hashlib
import http.server
import socket
import threading

import pytest

from qstar_jax.data import gsm8k, text
from qstar_jax.data.download import (
  DataChecksumError,
  DataUnavailableError,
  download_file,
  locate_or_download,
)

# The real files, located before any test changes QSTAR_DATA_DIR.
GSM8K_TEST = gsm8k.gsm8k_path("test")
GSM8K_TRAIN = gsm8k.gsm8k_path("train")
SHAKESPEARE = text.tiny_shakespeare_path()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  requests: list[str]

  def do_GET(self):  # noqa: N802 (http.server's name)
    self.requests.append(self.path)
    super().do_GET()

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _serve(folder):
  """Serves ``folder`` on 127.0.0.1 at a free port; yields (base URL, list of requested paths)."""
  requests: list[str] = []
  handler = functools.partial(
    type("Handler", (_QuietHandler,), {"requests": requests}), directory=str(folder)
  )
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
  """Empty data folder and cache; returns (data dir, cache dir, served folder)."""
  dirs = tuple(tmp_path / name for name in ("data", "cache", "served"))
  for d in dirs:
    d.mkdir()
  monkeypatch.setenv("QSTAR_DATA_DIR", str(dirs[0]))
  monkeypatch.setenv("QSTAR_CACHE_DIR", str(dirs[1]))
  return dirs


def _leftovers(folder) -> list[str]:
  return [p.name for p in folder.rglob("*.part")]


def test_gsm8k_downloads_verifies_and_caches_the_real_file(fresh_machine, monkeypatch):
  data, cache, served = fresh_machine
  (served / "test.jsonl").write_bytes(GSM8K_TEST.read_bytes())
  with _serve(served) as (url, requests):
    monkeypatch.setenv("QSTAR_GSM8K_URL", url)
    assert gsm8k.GSM8K_FILES["test"].url() == f"{url}test.jsonl"
    records = gsm8k.load_gsm8k("test")
    assert requests == ["/test.jsonl"]
    again = gsm8k.load_gsm8k("test")  # the cached copy: no second request
    assert requests == ["/test.jsonl"]
  assert records == again == gsm8k.load_gsm8k("test", path=GSM8K_TEST)
  assert len(records) == 1319
  cached = cache / "gsm8k" / "test.jsonl"
  assert hashlib.sha256(cached.read_bytes()).hexdigest() == gsm8k.GSM8K_SHA256["test"]
  assert list(data.iterdir()) == [] and _leftovers(cache) == []


def test_tiny_shakespeare_downloads_with_its_sha256(fresh_machine, monkeypatch):
  _, cache, served = fresh_machine
  (served / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
  with _serve(served) as (url, requests):
    monkeypatch.setenv("QSTAR_SHAKESPEARE_URL", url.rstrip("/"))
    corpus = text.load_tiny_shakespeare()
    assert requests == ["/input.txt"]
  assert corpus.encode() == SHAKESPEARE.read_bytes()
  assert len(corpus.encode()) == text.TINY_SHAKESPEARE_BYTES
  assert (cache / "tinyshakespeare" / "input.txt").is_file()


def test_corrupted_download_is_refused_and_the_cache_kept(fresh_machine, monkeypatch):
  _, cache, served = fresh_machine
  good = GSM8K_TEST.read_bytes()
  bad = good.replace(b"#### 18", b"#### 19", 1)
  bad_sha = hashlib.sha256(bad).hexdigest()
  remote = gsm8k.GSM8K_FILES["test"]
  with _serve(served) as (url, _):
    monkeypatch.setenv("QSTAR_GSM8K_URL", url)
    (served / "test.jsonl").write_bytes(bad)
    # Empty cache: refused, nothing saved.
    with pytest.raises(DataChecksumError) as refused:
      gsm8k.load_gsm8k("test")
    message = str(refused.value)
    assert f"has sha256 {bad_sha}, expected {gsm8k.GSM8K_SHA256['test']}" in message
    assert f"downloaded from {url}test.jsonl" in message and "GSM8K test file" in message
    assert not remote.cache_path().exists()
    # A good entry, then a corrupted re-download: refused, the entry's bytes unchanged.
    (served / "test.jsonl").write_bytes(good)
    assert download_file(remote) == cache / "gsm8k" / "test.jsonl"
    (served / "test.jsonl").write_bytes(bad)
    with pytest.raises(DataChecksumError, match=f"has sha256 {bad_sha}"):
      download_file(remote)
  assert remote.cache_path().read_bytes() == good
  assert _leftovers(cache) == []
  assert gsm8k.load_gsm8k("test")[0]["final_answer"] == "18"


def test_unreachable_download_names_the_settings_path_and_url(fresh_machine, monkeypatch):
  data, cache, served = fresh_machine
  url = _closed_port_url()
  monkeypatch.setenv("QSTAR_GSM8K_URL", url)
  with pytest.raises(DataUnavailableError) as unreachable:
    gsm8k.load_gsm8k("train")
  message = str(unreachable.value)
  for part in ("QSTAR_DATA_DIR", str(data / "gsm8k" / "train.jsonl"), f"{url}/train.jsonl",
               "QSTAR_GSM8K_URL", "refused"):
    assert part in message, (part, message)
  assert isinstance(unreachable.value, FileNotFoundError)  # callers catching that still do
  assert list((cache / "gsm8k").iterdir()) == []
  with _serve(served) as (served_url, _):  # reachable, but the file is not there: HTTP 404
    monkeypatch.setenv("QSTAR_GSM8K_URL", served_url)
    with pytest.raises(DataUnavailableError, match=r"train\.jsonl failed: HTTP Error 404"):
      gsm8k.load_gsm8k("train")


def test_local_file_wins_over_cache_and_url(fresh_machine, monkeypatch):
  data, _, _ = fresh_machine
  monkeypatch.setenv("QSTAR_GSM8K_URL", _closed_port_url())
  (data / "gsm8k").mkdir()
  (data / "gsm8k" / "test.jsonl").write_bytes(GSM8K_TEST.read_bytes())
  assert locate_or_download(gsm8k.GSM8K_FILES["test"]) == data / "gsm8k" / "test.jsonl"
  assert len(gsm8k.load_gsm8k("test")) == 1319


def test_tfds_builder_downloads_on_a_fresh_machine(fresh_machine, monkeypatch, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from qstar_jax.data import tfds_builders

  _, cache, served = fresh_machine
  for path in (GSM8K_TRAIN, GSM8K_TEST):
    (served / path.name).write_bytes(path.read_bytes())
  with _serve(served) as (url, requests):
    monkeypatch.setenv("QSTAR_GSM8K_URL", url)
    records = tfds_builders.read_gsm8k("test", tfds_dir=tmp_path / "tfds")
    assert sorted(requests) == ["/test.jsonl", "/train.jsonl"]
  assert records == gsm8k.load_gsm8k("test", path=GSM8K_TEST)
  assert (cache / "gsm8k" / "train.jsonl").is_file()
