"""The device-mapper control ioctls rcopy speaks (suspend, resume, message): their encoding here, their
effect in the lab (every cut and every thin change detection goes through them)."""
import errno
import struct

import pytest

from rcopy.sys import dm_ioctl, dmsetup


def test_requests_and_header_match_linux_dm_ioctl_h():
    assert dm_ioctl.HEADER.size == 312
    assert dm_ioctl.request(dm_ioctl.DEV_SUSPEND) == 0xC138FD06          # DM_DEV_SUSPEND
    assert dm_ioctl.request(dm_ioctl.TARGET_MSG) == 0xC138FD0E           # DM_TARGET_MSG
    assert dm_ioctl.request(dm_ioctl.DEV_STATUS) == 0xC138FD07           # DM_DEV_STATUS


def test_open_count_is_read_from_the_reply_and_waited_out(monkeypatch):
    counts = [2, 1, 0]

    def call(cmd, buf):
        assert cmd == dm_ioctl.DEV_STATUS and dm_ioctl.HEADER.unpack_from(buf)[11].rstrip(b"\0") == b"vg-lv"
        f = list(dm_ioctl.HEADER.unpack_from(buf))
        f[6] = counts.pop(0) if counts else 0
        dm_ioctl.HEADER.pack_into(buf, 0, *f)
        return buf
    monkeypatch.setattr(dm_ioctl, "_call", call)
    assert dmsetup.open_count("vg-lv") == 2
    assert dmsetup.wait_closed("vg-lv", 5, poll=0) is True and counts == []
    counts[:] = [1] * 1000
    assert dmsetup.wait_closed("vg-lv", 0, poll=0) is False


def test_a_message_is_laid_out_after_the_header_with_its_sector():
    payload = dm_ioctl.MSG_HEADER.pack(7) + b"reserve_metadata_snap\0"
    buf = dm_ioctl.pack("vg-pool-tpool", payload=payload, space=64)
    f = dm_ioctl.HEADER.unpack_from(buf)
    assert f[:3] == (4, 0, 0) and f[3] == len(buf) == 312 + len(payload) + 64 and f[4] == 312
    assert f[11].rstrip(b"\0") == b"vg-pool-tpool"
    assert bytes(buf[312:312 + len(payload)]) == payload
    assert dm_ioctl.reply_of(buf) == ""                                   # nothing written back
    struct_flags = dm_ioctl.HEADER.unpack_from(buf)
    out = bytearray(buf)
    dm_ioctl.HEADER.pack_into(out, 0, *struct_flags[:7], dm_ioctl.DATA_OUT_FLAG, *struct_flags[8:])
    out[312:320] = b"42 17\0\0\0"
    assert dm_ioctl.reply_of(out) == "42 17"


@pytest.mark.parametrize("name", ["", "x" * 128, "a\0b"])
def test_bad_names_never_reach_the_kernel(name):
    with pytest.raises(dm_ioctl.DmIoctlError):
        dm_ioctl.pack(name)


def test_suspend_and_resume_flags(monkeypatch):
    seen = []
    monkeypatch.setattr(dm_ioctl, "_call", lambda cmd, buf: seen.append((cmd, dm_ioctl.flags_of(buf))) or buf)
    dmsetup.suspend("a")
    dmsetup.suspend("a", flush=False)
    dmsetup.resume("a")
    S, N = dm_ioctl.SUSPEND_FLAG, dm_ioctl.NOFLUSH_FLAG
    assert seen == [(6, S), (6, S | N), (6, 0)]


def test_kernel_errors_come_back_typed(monkeypatch):
    def refuse(code):
        def call(cmd, buf):
            raise dm_ioctl.DmIoctlError(code, "refused")
        return call
    monkeypatch.setattr(dm_ioctl, "_call", refuse(errno.ENXIO))
    with pytest.raises(dmsetup.DmNotFound, match="device-mapper device gone not found"):
        dmsetup.resume("gone")
    monkeypatch.setattr(dm_ioctl, "_call", refuse(errno.EINVAL))
    with pytest.raises(dmsetup.DmError, match="message 'delete 3' of pool failed: refused"):
        dmsetup.message("pool", "delete 3")


def test_without_a_control_device_the_error_says_so(monkeypatch):
    monkeypatch.setattr(dm_ioctl, "CONTROL", "/nonexistent/control")
    with pytest.raises(dmsetup.DmError, match="cannot open /nonexistent/control"):
        dmsetup.suspend("x")


class FakeKernel:
    """The part of dm-ioctl.c a table reload goes through: DEV_STATUS (mode and dev), TABLE_STATUS
    (specs written with ``next`` from the data area), TABLE_LOAD (specs read with ``next`` from the
    spec before, the first from the header), and a resume that swaps in the loaded table."""

    def __init__(self, tables):
        self.live = {name: (True, t) for name, t in tables.items()}     # name -> (read-only, targets)
        self.inactive, self.events = {}, []

    def __call__(self, cmd, buf):
        f = list(dm_ioctl.HEADER.unpack_from(buf))
        name = f[11].rstrip(b"\0").decode()
        if name not in self.live:
            raise dm_ioctl.DmIoctlError(errno.ENXIO, "No such device or address")
        ro, targets = self.live[name]
        if cmd == dm_ioctl.DEV_STATUS:
            f[7] |= dm_ioctl.READONLY_FLAG if ro else 0
            f[10] = (253 << 8) | 4                      # huge_encode_dev(253:4)
        elif cmd == dm_ioctl.TABLE_STATUS:
            assert f[7] & dm_ioctl.STATUS_TABLE_FLAG
            out, at = f[4], f[4]
            for sector, length, kind, params in targets:
                raw = params.encode() + b"\0"
                dm_ioctl.SPEC.pack_into(buf, at, sector, length, 0, 0, kind.encode())
                buf[at + dm_ioctl.SPEC.size:at + dm_ioctl.SPEC.size + len(raw)] = raw
                nxt = -(-(at + dm_ioctl.SPEC.size + len(raw)) // 8) * 8
                struct.pack_into("=I", buf, at + 20, nxt - out)
                at = nxt
            f[5] = len(targets)
        elif cmd == dm_ioctl.TABLE_LOAD:
            at, got = f[4], []
            for _ in range(f[5]):
                sector, length, _s, nxt, kind = dm_ioctl.SPEC.unpack_from(buf, at)
                params = bytes(buf[at + dm_ioctl.SPEC.size:]).split(b"\0", 1)[0].decode()
                got.append((sector, length, kind.rstrip(b"\0").decode(), params))
                at += nxt
            self.inactive[name] = (bool(f[7] & dm_ioctl.READONLY_FLAG), got)
        elif cmd == dm_ioctl.DEV_SUSPEND and not f[7] & dm_ioctl.SUSPEND_FLAG:
            if name in self.inactive:
                self.live[name] = self.inactive.pop(name)
            self.events.append((name, f[8] >> dm_ioctl.UDEV_FLAGS_SHIFT))
        dm_ioctl.HEADER.pack_into(buf, 0, *f)
        return buf


def test_a_secondary_is_reloaded_with_the_same_table_in_the_other_mode_once(monkeypatch):
    import os
    striped = [(0, 2048, "striped", "2 128 254:16 2048 254:32 2048"), (2048, 4096, "linear", "254:16 10240")]
    k = FakeKernel({"vg-data": striped, "vg-data-real": [(0, 6144, "linear", "254:16 0")]})
    monkeypatch.setattr(dm_ioctl, "_call", k)
    assert dm_ioctl.table("vg-data") == striped
    assert dmsetup.set_writable("vg-data", True) == os.makedev(253, 4)
    assert k.live["vg-data"] == (False, striped)                    # the same targets, now read-write
    assert dmsetup.set_writable("vg-data", True) is None            # already so: nothing loaded
    assert dmsetup.set_writable("vg-data-real", True, hidden=True) == os.makedev(253, 4)
    assert dmsetup.set_writable("vg-data", False) is not None and k.live["vg-data"] == (True, striped)
    primary = dm_ioctl.UDEV_PRIMARY_SOURCE | dm_ioctl.UDEV_DISABLE_LIBRARY_FALLBACK
    hidden = primary | dm_ioctl.UDEV_DISABLE_SUBSYSTEM_RULES | dm_ioctl.UDEV_DISABLE_DISK_RULES | \
        dm_ioctl.UDEV_DISABLE_OTHER_RULES
    # every resume tells udev's rules it comes from device-mapper's owner (else LVM's links stay removed)
    assert k.events == [("vg-data", primary), ("vg-data-real", hidden), ("vg-data", primary)]
    with pytest.raises(dmsetup.DmNotFound):
        dmsetup.set_writable("vg-gone", True)


def test_a_device_number_is_decoded_as_the_kernel_encodes_it():
    import os
    for major, minor in ((253, 4), (253, 300), (8, 0), (259, 70000)):
        enc = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        assert dm_ioctl.decode_dev(enc) == os.makedev(major, minor)


class FakeMonitor:
    """pyudev's Monitor as dm_events_processed uses it: what udev reports, one event per poll."""

    def __init__(self, events):
        self.events, self.started = list(events), False

    def filter_by(self, subsystem):
        assert subsystem == "block"

    def start(self):
        self.started = True

    def poll(self, timeout=None):
        assert self.started
        if not self.events:
            return None
        action, devno, props = self.events.pop(0)
        return type("Dev", (), {"action": action, "device_number": devno, "properties": props})()


@pytest.mark.parametrize("events, waited_out", [
    # the read-only event (links removed) then the resume's (links back): done at the second
    ([("change", 7, {"DISK_RO": "1"}), ("change", 7, {"DM_COOKIE": "6291456"}), ("change", 9, {})], False),
    # udev never reports the resume: a warning once the time is up, not an endless wait
    ([("change", 7, {"DISK_RO": "1"})], True),
])
def test_a_read_only_flip_returns_once_udev_has_processed_its_resume(monkeypatch, tmp_path, caplog, events,
                                                                     waited_out):
    import pyudev
    from rcopy.sys import udev
    mon = FakeMonitor(events)
    monkeypatch.setattr(pyudev.Monitor, "from_netlink", staticmethod(lambda ctx: mon))
    (tmp_path / "control").touch()
    monkeypatch.setattr(udev, "UDEV_CONTROL", str(tmp_path / "control"))
    with udev.dm_events_processed(timeout=0.5) as expect:
        expect(7)
    assert ("did not report 1 device-mapper change" in caplog.text) == waited_out
    assert mon.events == ([("change", 9, {})] if not waited_out else [])
    monkeypatch.setattr(udev, "UDEV_CONTROL", str(tmp_path / "none"))      # no udev daemon: no monitor
    mon.started = False
    with udev.dm_events_processed() as expect:
        expect(7)
    assert not mon.started
