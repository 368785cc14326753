"""The refine split across two hosts (rcopy.changes.digest): the backup's digests of the candidate
blocks against the new snapshot's, the same extents as the local refine, and the local refine for
whatever the remote half fails to answer."""
import os
import random

import pytest

from rcopy.changes import digest
from rcopy.changes.scan import scan
from rcopy.errors import LinkError
from rcopy.extent import Extent

BLOCK = 4096
SIZE = 4 << 20


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def volumes(tmp_path):
    """old (the base), new (old with changes), and bak (what the backup holds: old's bytes)."""
    rnd = random.Random(5)
    old = bytearray(rnd.randbytes(SIZE))
    new = bytearray(old)
    nblocks = SIZE // BLOCK
    picked = rnd.sample(range(nblocks), 60)
    changed, zeroed = sorted(picked[:40]), sorted(picked[50:])     # picked[40:50]: untouched
    for i in changed:
        new[i * BLOCK:(i + 1) * BLOCK] = rnd.randbytes(BLOCK)
    for i in zeroed:
        new[i * BLOCK:(i + 1) * BLOCK] = bytes(BLOCK)
    paths = {n: str(tmp_path / f"{n}.img") for n in ("old", "new", "bak")}
    _write(paths["old"], old)
    _write(paths["new"], new)
    _write(paths["bak"], old)
    # candidates as thin_delta gives them: the 64 KiB chunks around every written block
    chunks = sorted({i * BLOCK // 65536 for i in picked})
    cands = [Extent(c * 65536, 65536) for c in chunks]
    return paths, cands, changed, zeroed


def backup_of(path, calls=None):
    def remote(spans):
        if calls is not None:
            calls.append(list(spans))
        return lambda: digest.digests_of(path, [list(s) for s in spans])
    return remote


def test_the_backups_digests_give_exactly_the_local_refines_extents(volumes):
    paths, cands, changed, zeroed = volumes
    calls = []
    got = list(digest.refine_remote(paths["old"], paths["new"], cands, backup_of(paths["bak"], calls)))
    want = list(scan(paths["old"], paths["new"], ranges=cands))
    assert got == want
    blocks = sorted(i for e in got for i in range(e.offset // BLOCK, e.end // BLOCK))
    assert blocks == sorted(changed + zeroed)           # an identical rewrite is no change
    zero = {i for e in got if e.zero for i in range(e.offset // BLOCK, e.end // BLOCK)}
    assert zero == set(zeroed)                          # a zeroed block goes as write-zeroes
    assert calls and sum((e - s) for c in calls for s, e in c) == sum(c.length for c in cands)


def test_a_block_the_backup_already_holds_is_not_sent(volumes):
    """What counts is what the backup holds, not the base: a block it has is skipped, one it lacks
    (even where old and new agree) is sent."""
    paths, cands, changed, zeroed = volumes
    with open(paths["new"], "rb") as f:
        new = f.read()
    held, lacking = changed[0], None
    with open(paths["bak"], "r+b") as f:
        f.seek(held * BLOCK)
        f.write(new[held * BLOCK:(held + 1) * BLOCK])
        inside = {c.offset // BLOCK + k for c in cands for k in range(16)} - set(changed) - set(zeroed)
        lacking = min(inside)
        f.seek(lacking * BLOCK)
        f.write(b"\x01" * BLOCK)
    got = {i for e in digest.refine_remote(paths["old"], paths["new"], cands, backup_of(paths["bak"]))
           for i in range(e.offset // BLOCK, e.end // BLOCK)}
    assert held not in got and lacking in got
    assert got == (set(changed) | set(zeroed) | {lacking}) - {held}


@pytest.mark.parametrize("failure", ["raises", "short"])
def test_a_failing_backup_leaves_the_rest_to_the_local_refine(volumes, monkeypatch, failure):
    paths, cands, changed, zeroed = volumes
    monkeypatch.setattr(digest, "BATCH_BLOCKS", 32)     # several requests
    good = backup_of(paths["bak"])
    n = [0]

    def flaky(spans):
        n[0] += 1
        if n[0] < 3:
            return good(spans)
        if failure == "raises":
            raise LinkError("the link went down")
        return lambda: b"\0" * 5
    got = list(digest.refine_remote(paths["old"], paths["new"], cands, flaky))
    assert n[0] == 3
    assert got == list(scan(paths["old"], paths["new"], ranges=cands))


def test_batches_split_long_spans_and_keep_order():
    spans = [(0, 10 * BLOCK), (20 * BLOCK, 23 * BLOCK)]
    got = list(digest.batches(spans, limit=4))
    assert got == [[(0, 4 * BLOCK)], [(4 * BLOCK, 8 * BLOCK)], [(8 * BLOCK, 10 * BLOCK), (20 * BLOCK, 22 * BLOCK)],
                   [(22 * BLOCK, 23 * BLOCK)]]
    assert all(sum((e - s) // BLOCK for s, e in b) <= 4 for b in got)


@pytest.mark.parametrize("spans, why", [
    ("0-4096", "not a list"),
    ([[0]], "not \\[start, end\\]"),
    ([[0, 100]], "unaligned"),
    ([[8192, 4096]], "empty"),
    ([[4096, 8192], [0, 4096]], "unsorted"),
    ([[0, SIZE + BLOCK]], "past the end"),
    ([[0, 8.0]], "not \\[start, end\\]"),
])
def test_a_peers_spans_are_checked(spans, why):
    with pytest.raises(digest.BadSpans, match=why):
        digest.check_spans(spans, SIZE)


def test_a_request_is_bounded():
    with pytest.raises(digest.BadSpans, match="more than 16384 blocks"):
        digest.check_spans([[0, (16384 + 1) * BLOCK]], 1 << 30)


def test_digests_are_one_per_block_and_differ_with_content(tmp_path):
    p = str(tmp_path / "d.img")
    _write(p, bytes(BLOCK) + b"x" * BLOCK + bytes(BLOCK))
    d = digest.digests_of(p, [[0, 3 * BLOCK]])
    assert len(d) == 3 * digest.DIGEST_SIZE
    assert d[:16] == d[32:] != d[16:32]
    assert os.path.getsize(p) == 3 * BLOCK


def test_a_read_error_on_this_side_is_not_taken_for_the_backups(volumes, monkeypatch):
    """The new snapshot failing here is this volume's read error (the engine marks it stale), not a
    reason to read it again through the local refine."""
    from rcopy.sys.blockio import ReadError
    paths, cands, *_ = volumes

    def failing(source, spans, **kw):
        raise ReadError(path=source.path, offset=spans[0][0], reason="Input/output error")
    monkeypatch.setattr(digest, "hashes", failing)
    with pytest.raises(ReadError, match="new.img"):
        list(digest.refine_remote(paths["old"], paths["new"], cands, backup_of(paths["bak"])))
