"""The layer cache: shared by digest, downloaded once, never poisoned by a failed fetch."""

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from imagegw.layercache import LayerCache

DATA = b"layer bytes " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_cached_layer_is_not_fetched_again(tmp_path):
    cache = LayerCache(tmp_path)
    calls = []

    def fetch(f):
        calls.append(1)
        f.write(DATA)

    p1, fetched1 = cache.get(DIGEST, len(DATA), fetch)
    p2, fetched2 = cache.get(DIGEST, len(DATA), fetch)
    assert (fetched1, fetched2) == (True, False)
    assert p1 == p2 and p1.read_bytes() == DATA and len(calls) == 1


def test_concurrent_gets_fetch_once(tmp_path):
    cache = LayerCache(tmp_path)
    calls = []

    def fetch(f):
        calls.append(1)
        time.sleep(0.2)  # long enough for every other thread to be waiting on the lock
        f.write(DATA)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(DIGEST, len(DATA), fetch)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sum(1 for _, fetched in results if fetched) == 1


def test_concurrent_processes_fetch_once(tmp_path):
    marker = tmp_path / "fetches"
    marker.mkdir()
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            try:

                def fetch(f):
                    (marker / str(os.getpid())).touch()
                    time.sleep(0.2)
                    f.write(DATA)

                LayerCache(tmp_path / "cache").get(DIGEST, len(DATA), fetch)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert len(list(marker.iterdir())) == 1
    assert (tmp_path / "cache" / "sha256" / DIGEST[7:]).read_bytes() == DATA


def test_failed_fetch_leaves_nothing_that_passes_as_complete(tmp_path):
    cache = LayerCache(tmp_path)

    def broken(f):
        f.write(DATA[:100])
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        cache.get(DIGEST, len(DATA), broken)
    assert not cache.has(DIGEST)
    # Only the download lock and the pin lock: no file that could pass as the blob.
    left = sorted(p.name for p in cache.path_for(DIGEST).parent.iterdir())
    assert left == [DIGEST[7:] + ".lock", DIGEST[7:] + ".pin"]
    path, fetched = cache.get(DIGEST, len(DATA), lambda f: f.write(DATA))
    assert fetched and path.read_bytes() == DATA


def test_partial_file_of_a_crashed_writer_is_cleaned_and_not_used(tmp_path):
    cache = LayerCache(tmp_path)
    final = cache.path_for(DIGEST)
    final.parent.mkdir(parents=True)
    crashed = Path(str(final) + ".partial.abc123")
    crashed.write_bytes(DATA[:10])
    assert not cache.has(DIGEST)
    cache.get(DIGEST, len(DATA), lambda f: f.write(DATA))
    assert not crashed.exists() and final.read_bytes() == DATA


def test_short_fetch_is_refused(tmp_path):
    cache = LayerCache(tmp_path)
    with pytest.raises(OSError, match="wrote 5 of"):
        cache.get(DIGEST, len(DATA), lambda f: f.write(b"short"))
    assert not cache.has(DIGEST)


@pytest.mark.parametrize("bad", ["sha256:../../etc", "md5:abc", "sha256:" + "A" * 64, "latest"])
def test_digest_never_steers_a_path(tmp_path, bad):
    with pytest.raises(ValueError):
        LayerCache(tmp_path).path_for(bad)
