"""The NBD wire format, declared as data (the NBD project's doc/proto.md, "fixed newstyle" negotiation).

Only constants, struct layouts and length bounds live here; rcopy.transport.handshake and .client speak
the protocol with them. Each message is a :class:`Message`: a big-endian ``struct`` format plus field
names, so encoding and decoding are generic and a test can round-trip captured bytes (pyroute2's
``fields`` tables are the model).
"""
from __future__ import annotations

import dataclasses
import errno as _errno
import struct
from typing import NamedTuple

# -- magics -----------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943        # "NBDMAGIC", first 8 bytes from the server
IHAVEOPT = 0x49484156454F5054        # "IHAVEOPT": newstyle server greeting, and prefix of every option
REPLY_MAGIC = 0x0003E889045565A9     # option reply
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags ----------------------------------------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0         # server -> client (uint16)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0       # client -> server (uint32)
FLAG_C_NO_ZEROES = 1 << 1

# -- options ------------------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9
REP_ERR_NAMES = {
    REP_ERR_UNSUP: "unsupported option", REP_ERR_POLICY: "forbidden by server policy",
    REP_ERR_INVALID: "invalid option", REP_ERR_PLATFORM: "not supported on this platform",
    REP_ERR_TLS_REQD: "server requires TLS", REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "server shutting down", REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    REP_ERR_TOO_BIG: "request too big",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (uint16, from NBD_INFO_EXPORT or the EXPORT_NAME reply) ------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- commands -----------------------------------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush",
             CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write-zeroes"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies -------------------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# -- errors on the wire (fixed values, not the host's errno numbering) ---------------------------------
WIRE_ERRNO = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
              95: "ENOTSUP", 108: "ESHUTDOWN"}
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108


def errno_name(code: int) -> str:
    return WIRE_ERRNO.get(code) or _errno.errorcode.get(code) or f"error {code}"


# -- messages -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Message:
    """A fixed-size message: a big-endian struct format and the names of its fields, in order."""

    name: str
    fmt: str
    fields: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "st", struct.Struct(self.fmt))
        object.__setattr__(self, "tuple", NamedTuple(self.name, [(f, int) for f in self.fields]))

    @property
    def size(self) -> int:
        return self.st.size

    def pack(self, **values) -> bytes:
        return self.st.pack(*(values[f] for f in self.fields))

    def unpack(self, data, offset: int = 0):
        return self.tuple(*self.st.unpack_from(data, offset))


SERVER_GREETING = Message("ServerGreeting", ">QQH", ("magic", "ihaveopt", "flags"))
CLIENT_FLAGS = Message("ClientFlags", ">I", ("flags",))
OPTION = Message("Option", ">QII", ("magic", "option", "length"))
OPTION_REPLY = Message("OptionReply", ">QIII", ("magic", "option", "type", "length"))
INFO_EXPORT_BODY = Message("InfoExport", ">HQH", ("info", "size", "flags"))
INFO_BLOCK_SIZE_BODY = Message("InfoBlockSize", ">HIII", ("info", "minimum", "preferred", "maximum"))
EXPORT_NAME_REPLY = Message("ExportNameReply", ">QH", ("size", "flags"))   # + 124 zeroes unless NO_ZEROES
REQUEST = Message("Request", ">IHHQQI", ("magic", "flags", "type", "handle", "offset", "length"))
SIMPLE_REPLY = Message("SimpleReply", ">IIQ", ("magic", "error", "handle"))
STRUCTURED_REPLY = Message("StructuredReply", ">IHHQI", ("magic", "flags", "type", "handle", "length"))
CHUNK_OFFSET = Message("ChunkOffset", ">Q", ("offset",))
CHUNK_HOLE = Message("ChunkHole", ">QI", ("offset", "length"))
CHUNK_ERROR = Message("ChunkError", ">IH", ("error", "msglen"))

# The hot path packs requests without the dict indirection of Message.pack.
pack_request = REQUEST.st.pack
EXPORT_NAME_PAD = 124

# Defaults when the server states no block-size constraints (proto.md: minimum 1, preferred 4096, and a
# maximum payload of 32 MiB is what every server accepts).
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 32 << 20
MAX_MIN_BLOCK = 1 << 16          # proto.md: the minimum block size is a power of 2, at most 64 KiB

# Bounds on lengths the server chooses, checked before reading them into memory. Strings on the wire are
# at most 4096 bytes (proto.md) and info items a dozen, so 64 KiB is generous for both.
MAX_OPTION_REPLY = 64 << 10      # all replies to one option, headers included
MAX_CHUNK_BODY = 64 << 10        # a structured reply chunk that carries no READ data (error, none, ...)


def valid_block_sizes(minimum: int, maximum: int) -> bool:
    """NBD_INFO_BLOCK_SIZE as proto.md allows it: the client aligns to minimum and caps at maximum."""
    return 0 < minimum <= MAX_MIN_BLOCK and minimum & (minimum - 1) == 0 and maximum >= minimum


def go_payload(name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    """Body of NBD_OPT_GO / NBD_OPT_INFO: export name and the info items requested."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)
