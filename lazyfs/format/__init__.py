"""The seekable EROFS blob format alone: bytes in, bytes out, no I/O."""
