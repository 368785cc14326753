"""The declared wire format against bytes written out by hand from proto.md."""
from rcopy.transport import nbd_proto as P


def test_request_layout_matches_spec():
    raw = P.REQUEST.pack(magic=P.REQUEST_MAGIC, flags=P.CMD_FLAG_FAST_ZERO, type=P.CMD_WRITE_ZEROES,
                         handle=7, offset=4096, length=8192)
    assert raw == bytes.fromhex("25609513" "0010" "0006" "0000000000000007" "0000000000001000" "00002000")
    assert P.REQUEST.size == 28
    assert P.REQUEST.unpack(raw).length == 8192
    assert P.pack_request(P.REQUEST_MAGIC, P.CMD_FLAG_FAST_ZERO, P.CMD_WRITE_ZEROES, 7, 4096, 8192) == raw


def test_replies_decode():
    simple = bytes.fromhex("67446698" "00000005" "00000000000000ff")
    r = P.SIMPLE_REPLY.unpack(simple)
    assert (r.magic, r.error, r.handle) == (P.SIMPLE_REPLY_MAGIC, P.EIO, 255)
    chunk = bytes.fromhex("668e33ef" "0001" "0001" "0000000000000003" "00000208")
    c = P.STRUCTURED_REPLY.unpack(chunk)
    assert (c.flags, c.type, c.handle, c.length) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 3, 520)


def test_handshake_messages():
    greet = bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    g = P.SERVER_GREETING.unpack(greet)
    assert g.magic == P.NBDMAGIC and g.ihaveopt == P.IHAVEOPT and g.flags == 3
    info = bytes.fromhex("0003" "00001000" "00001000" "02000000")
    b = P.INFO_BLOCK_SIZE_BODY.unpack(info)
    assert (b.minimum, b.preferred, b.maximum) == (4096, 4096, 32 << 20)
    assert P.go_payload("vol") == bytes.fromhex("00000003") + b"vol" + bytes.fromhex("0001" "0003")
    rep = P.OPTION_REPLY.pack(magic=P.REPLY_MAGIC, option=P.OPT_GO, type=P.REP_ERR_UNKNOWN, length=0)
    assert rep.hex() == "0003e889045565a9" "00000007" "80000006" "00000000"


def test_wire_errno_names_are_protocol_values():
    assert P.errno_name(P.ENOTSUP) == "ENOTSUP" and P.errno_name(108) == "ESHUTDOWN"
