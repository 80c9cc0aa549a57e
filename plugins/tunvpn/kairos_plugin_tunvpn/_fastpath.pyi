# Types of the C extension built from _fastpath.c (see its docstrings for what each call does).
from _typeshed import ReadableBuffer, WriteableBuffer

class GcmKey:
    """AES-256-GCM under one key, with the data plane's loops over runs of datagrams."""

    def __init__(self, key: ReadableBuffer, /) -> None: ...
    def seal_run(
        self,
        out: WriteableBuffer,
        offset: int,
        slot: int,
        count: int,
        headers: ReadableBuffer,
        step: ReadableBuffer,
        payload: ReadableBuffer,
        payload_offset: int,
        gso_size: int,
        /,
    ) -> None: ...
    def open_run(
        self, buf: WriteableBuffer, count: int, size: int, prefix: ReadableBuffer, highest: int, vip: ReadableBuffer, /
    ) -> tuple[bytes, int, bytes]: ...

def append_segments(
    dst: WriteableBuffer,
    end: int,
    limit: int,
    src: ReadableBuffer,
    first: int,
    stride: int,
    count: int,
    length: int,
    header_len: int,
    segment_size: int,
    mask: ReadableBuffer,
    expect: ReadableBuffer,
    seq_at: int,
    /,
) -> tuple[int, int, int, int]: ...
