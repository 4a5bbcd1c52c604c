import pytest

from flywheel.service.spool import Record, Spool, SpoolCorrupt


def recs(n, start=0):
    return [Record("t", f"k{i}".encode(), f'{{"i":{i}}}'.encode()) for i in range(start, start + n)]


def test_append_peek_commit_in_order(tmp_path):
    spool = Spool(tmp_path / "s", fsync=False)
    spool.append(recs(5))
    first, end = spool.peek(3)
    assert [r.key for r in first] == [b"k0", b"k1", b"k2"]
    spool.commit(end, 3)
    rest, end2 = spool.peek(10)
    assert [r.key for r in rest] == [b"k3", b"k4"] and spool.pending == 2
    spool.commit(end2, 2)
    assert spool.pending == 0 and not spool.path.exists()


def test_survives_a_restart_at_the_checkpoint(tmp_path):
    spool = Spool(tmp_path / "s", fsync=False)
    spool.append(recs(4))
    _, end = spool.peek(1)
    spool.commit(end, 1)
    spool.close()  # as a process exit would
    reopened = Spool(tmp_path / "s", fsync=False)
    assert reopened.pending == 3
    assert [r.key for r in reopened.peek(10)[0]] == [b"k1", b"k2", b"k3"]


def test_torn_tail_is_dropped_and_later_appends_stay_readable(tmp_path):
    spool = Spool(tmp_path / "s", fsync=False)
    spool.append(recs(2))
    with open(spool.path, "ab") as f:
        f.write(b"\x00\x01\x00")  # a crash mid-append
    spool.close()  # as a process exit would
    reopened = Spool(tmp_path / "s", fsync=False)
    assert reopened.pending == 2
    reopened.append(recs(1, start=2))
    assert [r.key for r in reopened.peek(10)[0]] == [b"k0", b"k1", b"k2"]


def test_corruption_in_the_middle_is_not_guessed_around(tmp_path):
    spool = Spool(tmp_path / "s", fsync=False)
    spool.append(recs(3))
    data = bytearray(spool.path.read_bytes())
    data[20] ^= 0xFF
    spool.path.write_bytes(bytes(data))
    spool.close()
    with pytest.raises(SpoolCorrupt):
        Spool(tmp_path / "s", fsync=False)


def test_one_process_per_spool(tmp_path):
    from flywheel.service.spool import SpoolLocked

    first = Spool(tmp_path / "s", fsync=False)
    with pytest.raises(SpoolLocked, match="its own FLYWHEEL_HOME"):
        Spool(tmp_path / "s", fsync=False)
    first.close()
    Spool(tmp_path / "s", fsync=False).close()
