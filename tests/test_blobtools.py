"""The independent test encoder must itself be right, or it proves nothing."""

from __future__ import annotations

import os

import zstandard
from support.blobtools import stream_frame


def test_stream_frame_round_trips_data_larger_than_one_feed_piece() -> None:
    raw = os.urandom(300 << 10)  # several 64 KiB pieces
    frame = stream_frame(raw)
    out = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    assert out == raw


def test_stream_frame_has_no_content_size_like_a_streaming_encoder() -> None:
    frame = stream_frame(b"x" * 1000)
    assert zstandard.frame_content_size(frame) == -1
