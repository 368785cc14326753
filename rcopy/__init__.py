"""rcopy: snapshot-based asynchronous block replication on device-mapper."""
__version__ = "0.1.0"
