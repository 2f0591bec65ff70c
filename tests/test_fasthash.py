import hashlib

from imagegw.fasthash import CHUNK, STEP, fasthash


def test_small_file_is_plain_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"blah blah hash")
    assert fasthash(path) == hashlib.sha256(b"blah blah hash").hexdigest()


def test_large_sparse_file_hashes_one_mib_per_512_mib(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.write(b"A" * CHUNK + b"tail-of-first-chunk-not-hashed")
        f.seek(STEP)
        f.write(b"B" * 10)
        f.seek(2 * STEP - 5)
        f.write(b"C" * 5)
    want = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in (0, STEP):
            f.seek(offset)
            want.update(f.read(CHUNK))
    assert fasthash(path) == want.hexdigest()
