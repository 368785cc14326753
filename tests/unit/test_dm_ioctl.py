"""The device-mapper control ioctls rcopy speaks (suspend, resume, message): their encoding here, their
effect in the lab (every cut and every thin change detection goes through them)."""
import errno

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
