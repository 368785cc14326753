"""Zero runs to a thin secondary unmap whole pool blocks (native/rcopy_unmap_filter.c, chosen by
rcopy.backends.unmap_granules). The discard on dm-thin itself runs in the lab (tests/lab/test_integrity.py);
here: which secondaries qualify, the filter's configuration, and its answer where the device refuses
the discard (a regular file: the zeroes are written, the data is the same)."""
import dataclasses
import os
import shutil
import subprocess

import pytest

from rcopy import backends
from rcopy.sys import lvm, nbdkit

needs_nbdkit = pytest.mark.skipif(not shutil.which("nbdkit"), reason="nbdkit not installed (scripts/setup)")
KIB64 = 65536


def _lv(name, **kw):
    base = dict(vg="vg", name=name, path=f"/dev/vg/{name}", dm_path=f"/dev/mapper/vg-{name}", attr="Vwi-a-tz--",
                size=1 << 26, segtype="thin", origin="", pool="pool", thin_id=1, chunk_size=0, active=True,
                skip_activation=False, snapshot_invalid=False, merging=False, merge_failed=False, open=False,
                suspended=False, extent_size=1 << 20)
    base.update(kw)
    return lvm.LV(**base)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """LVM's report and the sysfs queue of each volume, as a dict the test edits."""
    lvs = {"/dev/vg/a": _lv("a"), "/dev/vg/b": _lv("b")}
    pools = {"pool": _lv("pool", segtype="thin-pool", pool="", chunk_size=KIB64, zero=True)}
    queues = {}
    for path in lvs:
        q = tmp_path / path.replace("/", "_") / "queue"
        q.mkdir(parents=True)
        (q / "discard_max_bytes").write_text("17179869184\n")
        (q / "discard_granularity").write_text(f"{KIB64}\n")
        queues[path] = str(q)
    monkeypatch.setattr(lvm, "by_path", lambda p: lvs[p])
    monkeypatch.setattr(lvm, "get", lambda vg, name: pools.get(name))
    monkeypatch.setattr(backends, "_queue_dir", lambda p, sysfs: queues.get(p))
    return lvs, pools, queues


def test_a_thin_secondary_in_a_zeroing_pool_with_discards_unmaps_whole_pool_blocks(world):
    lvs, pools, queues = world
    pairs = [("thin", "/dev/vg/a"), ("thin", "/dev/vg/b"), ("cow", "/dev/vg/c")]
    assert backends.unmap_granules(pairs) == {"/dev/vg/a": KIB64, "/dev/vg/b": KIB64}
    # the pool's block size wins over a smaller discard granularity: dm-thin unmaps whole blocks only
    pools["pool"] = dataclasses.replace(pools["pool"], chunk_size=1 << 20)
    assert backends.unmap_granules(pairs)["/dev/vg/a"] == 1 << 20


@pytest.mark.parametrize("why", ["origin", "no-zeroing", "discards-ignored", "not-thin", "no-queue"])
def test_anything_that_would_not_read_zeroes_after_a_discard_writes_them(world, why):
    lvs, pools, queues = world
    if why == "origin":             # a thin snapshot, or an external origin that shows through a hole
        lvs["/dev/vg/a"] = dataclasses.replace(lvs["/dev/vg/a"], origin="base")
    elif why == "no-zeroing":       # -Zn: a later partial write to an unmapped block leaves stale data around it
        pools["pool"] = dataclasses.replace(pools["pool"], zero=False)
    elif why == "discards-ignored":
        with open(os.path.join(queues["/dev/vg/a"], "discard_max_bytes"), "w") as f:
            f.write("0\n")
    elif why == "not-thin":
        lvs["/dev/vg/a"] = dataclasses.replace(lvs["/dev/vg/a"], segtype="linear", pool="")
    elif why == "no-queue":         # not a block device
        queues.pop("/dev/vg/a")
    assert "/dev/vg/a" not in backends.unmap_granules([("thin", "/dev/vg/a"), ("thin", "/dev/vg/b")])


@needs_nbdkit
@pytest.mark.parametrize("value", ["vol", "vol:65536", ":65536:/dev/x", "vol:65535:/dev/x", "vol:abc:/dev/x",
                                   "vol:256:/dev/x", "vol:65536:relative"])
def test_the_filter_refuses_a_malformed_unmap_entry(value):
    assert os.path.exists(nbdkit.UNMAP_FILTER), "rcopy's unmap filter is not built (setup.py build_ext)"
    r = subprocess.run(["nbdkit", f"--filter={nbdkit.UNMAP_FILTER}", "memory", "1M", f"unmap={value}", "--run", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "rcopy-unmap" in r.stderr, r.stderr


@needs_nbdkit
def test_where_the_device_refuses_the_discard_the_zeroes_are_written(tmp_path):
    """A regular file takes no BLKDISCARD: the zero run reaches the plugin whole and reads back as
    zeroes; the other export of the same server is untouched by the filter."""
    from rcopy.transport.client import NbdClient
    from rcopy.transport.export import Export
    assert nbdkit.unmap_filter() == nbdkit.UNMAP_FILTER, "rcopy's unmap filter does not load in this nbdkit"
    data = os.urandom(1 << 20)
    for name in ("thin", "other"):
        (tmp_path / name).write_bytes(data)
    with Export({"thin": str(tmp_path / "thin"), "other": str(tmp_path / "other")}, unmap={"thin": KIB64}) as ex:
        assert any(f"--filter={nbdkit.UNMAP_FILTER}" in a for a in ex.server.proc.args), ex.server.proc.args
        for name in ("thin", "other"):
            c = NbdClient(ex.infos[name].host, ex.infos[name].port, name)
            try:
                c.zero(4096, 3 * KIB64, wait=True)          # an unaligned head, two whole blocks, a tail
                c.flush()
                got = c.pread(1 << 20, 0)
            finally:
                c.close()
            assert got[4096:4096 + 3 * KIB64] == bytes(3 * KIB64)
            assert got[:4096] == data[:4096] and got[4096 + 3 * KIB64:] == data[4096 + 3 * KIB64:]
