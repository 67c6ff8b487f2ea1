from clipsearch.fingerprint import HEAD_BYTES, fingerprint


def write(path, data):
    path.write_bytes(data)
    return path


def test_same_content_anywhere_gives_the_same_fingerprint(tmp_path):
    data = bytes(range(256)) * 5000
    assert fingerprint(write(tmp_path / "a.jpg", data)) == fingerprint(write(tmp_path / "b.jpg", data))
    assert len(fingerprint(tmp_path / "a.jpg")) == 16


def test_head_tail_and_size_changes_are_seen(tmp_path):
    data = bytearray(b"\x01" * (3 * HEAD_BYTES))
    base = fingerprint(write(tmp_path / "base", bytes(data)))
    head = bytearray(data)
    head[10] ^= 1
    tail = bytearray(data)
    tail[-5] ^= 1
    assert fingerprint(write(tmp_path / "head", bytes(head))) != base
    assert fingerprint(write(tmp_path / "tail", bytes(tail))) != base
    assert fingerprint(write(tmp_path / "longer", bytes(data) + b"\x01")) != base


def test_the_unread_middle_of_a_large_file_is_not_seen(tmp_path):
    # The documented trade-off: a fixed cost per file instead of reading whole photos.
    data = bytearray(b"\x01" * (3 * HEAD_BYTES))
    middle = bytearray(data)
    middle[2 * HEAD_BYTES] ^= 1
    assert fingerprint(write(tmp_path / "a", bytes(data))) == fingerprint(write(tmp_path / "b", bytes(middle)))


def test_small_files_are_hashed_whole(tmp_path):
    assert fingerprint(write(tmp_path / "a", b"abc")) != fingerprint(write(tmp_path / "b", b"abd"))
    assert fingerprint(write(tmp_path / "empty", b"")) != fingerprint(write(tmp_path / "a", b"abc"))
