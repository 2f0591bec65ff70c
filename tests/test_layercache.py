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


# -- pruning: least recently used first, never a blob in use ------------------------------


def _blob(n: int) -> tuple[str, bytes]:
    data = f"blob {n} ".encode() * 100  # 700-ish bytes each
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _fill(cache: LayerCache, count: int, t0: float = 1_000_000.0) -> list[tuple[str, bytes]]:
    """``count`` blobs, blob i last used at t0 + i (so blob 0 is the least recent)."""
    blobs = [_blob(n) for n in range(count)]
    for digest, data in blobs:
        cache.get(digest, len(data), lambda f, d=data: f.write(d))
    cache.unpin_all()
    for i, (digest, _) in enumerate(blobs):
        os.utime(cache.path_for(digest), (t0 + i, t0 + i))
    return blobs


def _present(cache: LayerCache, blobs) -> list[int]:
    return [i for i, (digest, data) in enumerate(blobs) if cache.has(digest, len(data))]


def test_prune_by_size_removes_least_recently_used_first(tmp_path):
    cache = LayerCache(tmp_path)
    blobs = _fill(cache, 5)
    size = len(blobs[0][1])
    # Blob 1 is used again (a later pull found it): it is now the most recent.
    cache.get(blobs[1][0], size, lambda f: pytest.fail("cached: no fetch"))
    cache.unpin_all()
    result = cache.prune(max_bytes=2 * size + size // 2)
    assert _present(cache, blobs) == [1, 4]
    assert result.removed == [blobs[i][0] for i in (0, 2, 3)]  # oldest use first
    assert result.total_after == 2 * size <= 2 * size + size // 2
    assert result.freed == 3 * size


def test_prune_by_age(tmp_path):
    cache = LayerCache(tmp_path)
    blobs = _fill(cache, 4, t0=1_000_000.0)
    cache.prune(max_age=1.5, now=1_000_003.0)  # unused for more than 1.5 s: blobs 0 and 1
    assert _present(cache, blobs) == [2, 3]
    assert cache.prune().removed == []  # no limit, nothing done


PIN_AND_WAIT = """
import sys, time
from imagegw.layercache import LayerCache
cache = LayerCache(sys.argv[1])
cache.pin(sys.argv[2])
print("pinned", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_prune_never_removes_a_blob_another_process_is_using(tmp_path):
    import subprocess
    import sys

    cache = LayerCache(tmp_path)
    blobs = _fill(cache, 3)
    oldest = blobs[0][0]
    # A pull in another gunicorn worker holds the oldest blob (the first LRU victim).
    holder = subprocess.Popen(
        [sys.executable, "-c", PIN_AND_WAIT, str(tmp_path), oldest],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "pinned"
        result = cache.prune(max_bytes=0)
        assert _present(cache, blobs) == [0]
        assert result.kept_in_use == [oldest]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Released: now it goes too.
    assert cache.prune(max_bytes=0).removed == [oldest]
    assert _present(cache, blobs) == []


def test_a_blob_pinned_by_this_cache_is_kept_too(tmp_path):
    cache = LayerCache(tmp_path)
    blobs = _fill(cache, 2)
    with cache.pinned():
        cache.get(blobs[0][0], len(blobs[0][1]), lambda f: pytest.fail("cached"))
        assert cache.prune(max_bytes=0).kept_in_use == [blobs[0][0]]
        assert _present(cache, blobs) == [0]
    assert cache.prune(max_bytes=0).removed == [blobs[0][0]]


def test_one_pruner_at_a_time(tmp_path):
    import fcntl

    cache = LayerCache(tmp_path)
    blobs = _fill(cache, 2)
    fd = os.open(tmp_path / ".prune.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is pruning
        assert cache.prune(max_bytes=0).removed == []
        assert _present(cache, blobs) == [0, 1]
    finally:
        os.close(fd)
