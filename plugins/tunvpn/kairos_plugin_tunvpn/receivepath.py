"""The receive path, UDP → TUN: datagrams become inner packets written to the TUN.

``recvmsg`` with UDP GRO returns a train of datagrams per call; open each datagram, check that the
inner source address belongs to the peer whose key opened it, and write to the TUN, coalescing
consecutive TCP segments into one GSO write (:class:`~.vnet.TcpCoalescer`). A lost wire datagram
costs exactly one inner packet. Everything wrong is dropped and counted; nothing a peer sends can
stop a thread. Datagrams that came over a peer's fallback stream enter here too
(:meth:`ReceivePath.inject_batch_from_fallback`).

The key id is readable by anyone who sees the traffic, so before any AES-GCM open a datagram must
come from the endpoint its session last authenticated from; one from another endpoint (the peer
roaming, or a flood) is opened only within the budget of :class:`~.roaming.RoamLimiter`, and
dropped unopened beyond it (``drop_roam_limited``). A GRO train is judged once, by its first
datagram: a flood costs a dictionary lookup per train.

:class:`ReceivePath` is one half of :class:`~.dataplane.DataPlane`, which owns the socket, the
buffers, the counters and the threads.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag

from .counters import Counters
from .peertable import Peer, PeerTable
from .relaydgram import RelayTable
from .roaming import RoamLimiter
from .tun import TunDevice
from .vnet import GSO_NONE, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, TcpCoalescer, complete_checksum
from .wire import HEADER_BYTES, KEY_ID, KIND_DATA, OVERHEAD, WIRE_HEADER, WIRE_WORDS, OpenViews, open_slots

UDP_GRO = 104
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_GRO_SIZE = struct.Struct("=i")


class ReceivePath(PeerTable):
    """Opening and delivering: the methods the receiving thread (and fallback streams) call."""

    # set by the data plane
    _counters: Counters
    _rx_lock: threading.Lock
    _rx_buf: bytearray
    _rx_view: memoryview
    _coalescer: TcpCoalescer | None
    tun: TunDevice
    roam_limiter: RoamLimiter
    _sock: socket.socket
    #: the sessions this node relays for other pairs (None: it relays none)
    relay: RelayTable | None = None

    if TYPE_CHECKING:

        def _log_once(self, message: str, exc_info: bool = False) -> None: ...

    def inject_from_fallback(self, peer_id: str, datagram: bytes) -> bool:
        """Process a datagram that ``peer_id`` sent over the fallback stream; True if delivered.

        The datagram must open under ``peer_id``'s keys: a stream cannot speak for another peer.
        """
        return self.inject_batch_from_fallback(peer_id, (datagram,)) > 0

    def inject_batch_from_fallback(self, peer_id: str, datagrams: Iterable[bytes]) -> int:
        """Process datagrams ``peer_id`` sent over the fallback stream; return how many were delivered.

        One lock and one coalescer flush for the whole batch. Such datagrams move
        :meth:`last_heard` but never :meth:`udp_heard`.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            self._counters.drop_unknown_peer += 1
            return 0
        with self._rx_lock:
            before = self._counters.rx_packets
            for datagram in datagrams:
                try:
                    self._open_datagram(memoryview(datagram), None, expected=peer)
                except Exception:  # a bug must not reach the stream reader
                    self._counters.drop_malformed += 1
                    self._log_once("tunvpn: datagram dropped", exc_info=True)
            if self._coalescer is not None:
                self._coalescer.flush()
            return self._counters.rx_packets - before

    def _receive(
        self, rview: memoryview, n: int, ancillary: list[tuple[int, int, bytes]], address: tuple[str, int], open_views: OpenViews
    ) -> None:
        """Open what one ``recvmsg`` returned (a GRO train, or one datagram) and write it to the TUN."""
        counters = self._counters
        size = n
        for level, kind, data in ancillary:
            if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                size = _GRO_SIZE.unpack_from(data)[0]
        if size <= 0:
            size = n
        relay = self.relay
        if relay is not None and relay.forward(self._sock, rview, n, size, address, self._open_own):
            return  # another pair's sealed datagrams, relayed unopened (:mod:`.relaydgram`)
        counters.rx_batches += 1
        with self._rx_lock:
            try:
                self._open_train(rview, n, size, address, open_views)
                if self._coalescer is not None:
                    self._coalescer.flush()
            except Exception:
                counters.drop_malformed += 1
                self._log_once("tunvpn: datagram dropped", exc_info=True)

    def _open_train(
        self,
        view: memoryview,
        n: int,
        size: int,
        address: tuple[str, int],
        open_views: OpenViews | None = None,
    ) -> None:
        """Open a GRO train: datagrams of ``size`` bytes (the last may be shorter) from one sender.

        Fast path for the common case — every datagram of the train under the same key id and
        epoch, authentic, from the peer's own VIP — with the per-train lookups done once, the
        replay window kept in local variables and the ``decrypt_into`` views of each train
        position made once per datagram size (in ``open_views``, for ``view``); any datagram that
        leaves it goes through :meth:`_open_datagram`, which counts the reason.
        """
        coalescer = self._coalescer
        if n <= 0:
            self._counters.drop_malformed += 1  # an empty datagram: nothing to open, no train to cut
            return
        if size <= 0:
            size = n  # no usable GRO segment size: one datagram
        if n >= HEADER_BYTES:
            # the pre-check before any AES-GCM open, once per train: a GRO train has one source
            peer = self._by_key_id.get(KEY_ID.unpack_from(view, 4)[0])
            if peer is not None and not peer.expects(address):
                if not self._may_roam(address):
                    self._counters.drop_roam_limited += (n + size - 1) // size
                    return
                # one by one: the first that authenticates moves the session here and the others
                # then pass; until one does, each needs a token of its own
                self._open_datagram(view[: min(size, n)], address, prechecked=True)
                for start in range(size, n, size):
                    self._open_datagram(view[start : min(start + size, n)], address)
                return
        if n < OVERHEAD + 20 or size >= n or size < OVERHEAD + 20 or coalescer is None:
            for start in range(0, n, size):
                self._open_datagram(view[start : min(start + size, n)], address)
            return
        kind, epoch_byte, csum_start, csum_offset, key_id, _ = WIRE_HEADER.unpack_from(view)
        peer = self._by_key_id.get(key_id)
        epoch = peer.receive.epoch_for(epoch_byte) if peer is not None and kind == KIND_DATA else None
        if epoch is None or peer is None or peer.endpoint is None or (csum_start and csum_start + csum_offset + 22 > size):
            for start in range(0, n, size):
                self._open_datagram(view[start : min(start + size, n)], address)
            return
        prefix = WIRE_WORDS.unpack_from(view)[0]  # kind, epoch, checksum offsets, key id
        full = n // size
        if open_views is None:
            open_views = {}
        views = open_views.get(size)
        if views is None or len(views) < full:
            if len(open_views) > 16:
                open_views.clear()
            views = open_views[size] = open_slots(view, self._rx_view, size, len(view) // size)
        slots = views[:full]
        tail = n - full * size
        if tail >= OVERHEAD + 20:
            slots.append(open_slots(view[full * size : n], self._rx_view, tail, 1)[0])
        window = epoch.window
        highest, bits, window_size = window.highest, window.bits, window.size
        decrypt_into = epoch.aead.decrypt_into
        vip = peer.vip_bytes
        buf = self._rx_buf
        push = coalescer.push
        counters = self._counters
        unpack_words = WIRE_WORDS.unpack_from
        base = VNET_HDR_LEN
        delivered = 0
        delivered_bytes = 0
        authentic = False
        fast = epoch.fast
        if fast is not None:
            # the datagrams in order under one key, opened in place by C; the loop below takes
            # over at the first one that is not (another peer or epoch, a replay, a late one)
            status, last, run = fast.open_run(view, full, size, view[:8], highest, vip or b"\0\0\0\0")
            if run:
                run_bits = int.from_bytes(run, "little")
                shift = last - highest
                bits = bits << shift | run_bits if shift < window_size else run_bits
                highest = last
                authentic = True
            length = size - OVERHEAD
            fast_views = open_views.get(-size)
            if fast_views is None or len(fast_views) < full:
                fast_views = open_views[-size] = [
                    view[at + HEADER_BYTES - base : at + HEADER_BYTES + length] for at in range(0, len(view) - size + 1, size)
                ]
            append_run = coalescer.append_run
            index, handled = 0, len(status)
            while index < handled:
                code = status[index]
                if code == 0:
                    # the segments that continue the pending TCP frame are appended by C too
                    zeros = handled - index - len(status[index:].lstrip(b"\0"))
                    taken = append_run(view, index * size + HEADER_BYTES, size, zeros, length, csum_start, csum_offset)
                    if taken:
                        delivered += taken
                        delivered_bytes += taken * length
                        index += taken
                        continue
                packet = fast_views[index]
                if code == 0 or (code == 2 and packet[base] >> 4 == 4 and peer.owns_source(bytes(packet[base + 12 : base + 16]))):
                    delivered += 1
                    delivered_bytes += length
                    push(packet, length, csum_start, csum_offset)
                elif code == 1:
                    counters.drop_bad_tag += 1
                else:
                    counters.drop_spoofed_source += 1
                index += 1
            slots = slots[handled:]
        for datagram, nonce, sealed, header, inner, length in slots:
            head, counter = unpack_words(header)
            if head != prefix or (counter <= highest and (highest - counter >= window_size or (bits >> (highest - counter)) & 1)):
                # not the train's peer and epoch, or a replay: the slow path counts why
                window.highest, window.bits = highest, bits & window.mask
                self._open_datagram(datagram, address)
                highest, bits = window.highest, window.bits
                continue
            try:
                decrypt_into(nonce, sealed, header, inner)
            except InvalidTag:
                counters.drop_bad_tag += 1
                continue
            # ReplayWindow.update on locals; bits above the mask are cut once, after the train
            if counter > highest:
                shift = counter - highest
                bits = bits << shift | 1 if shift < window_size else 1
                highest = counter
            else:
                bits |= 1 << (highest - counter)
            authentic = True
            # the version nibble first: bytes 12..15 are a source address only in an IPv4 packet
            if buf[base] >> 4 != 4 or (
                buf[base + 12 : base + 16] != vip and not peer.owns_source(bytes(buf[base + 12 : base + 16]))
            ):
                counters.drop_spoofed_source += 1
                continue
            delivered += 1
            delivered_bytes += length
            push(buf, length, csum_start, csum_offset)
        window.highest, window.bits = highest, bits & window.mask
        if authentic:
            peer.receive.confirm(epoch)
            now = time.monotonic()
            peer.heard = now
            # what a relay forwards is not a UDP path of our own to the peer (:mod:`.relaydgram`)
            if address == peer.relayed_from:
                peer.relay_heard = now
            else:
                peer.udp_heard = now
        counters.rx_packets += delivered
        counters.rx_bytes += delivered_bytes
        if 0 < tail < OVERHEAD + 20:
            self._open_datagram(view[full * size : n], address)  # too short: counted there

    def _open_own(self, datagram: memoryview, address: tuple[str, int]) -> None:
        """Open one datagram of this node's own that came in a train of relayed ones."""
        with self._rx_lock:
            try:
                self._open_datagram(datagram, address)
                if self._coalescer is not None:
                    self._coalescer.flush()
            except Exception:
                self._counters.drop_malformed += 1
                self._log_once("tunvpn: datagram dropped", exc_info=True)

    def _may_roam(self, address: tuple[str, int]) -> bool:
        """True if a datagram from ``address``, not its session's endpoint, may be opened."""
        if self.roam_limiter.allow(address):
            self._counters.roam_opens += 1
            return True
        return False

    def _open_datagram(
        self, datagram: memoryview, address: tuple[str, int] | None, expected: Peer | None = None, prechecked: bool = False
    ) -> None:
        """Open one datagram and deliver it; ``address`` is its UDP source (None: it came over
        the fallback stream of ``expected``); ``prechecked``: its roaming token is taken."""
        counters = self._counters
        length = len(datagram) - OVERHEAD
        if length < 20:
            counters.drop_malformed += 1
            return
        kind, epoch_byte, csum_start, csum_offset, key_id, counter = WIRE_HEADER.unpack_from(datagram)
        if kind != KIND_DATA:
            counters.drop_malformed += 1
            return
        peer = self._by_key_id.get(key_id)
        if peer is None or (expected is not None and peer is not expected):
            counters.drop_unknown_peer += 1
            return
        receive = peer.receive
        epoch = receive.epoch_for(epoch_byte)
        if epoch is None:
            counters.drop_stale_epoch += 1
            return
        window = epoch.window
        if not window.check(counter):
            counters.drop_replay += 1
            return
        # the last check before the costly open: what it lets through from other endpoints is budgeted
        if address is not None and not peer.expects(address) and not prechecked and not self._may_roam(address):
            counters.drop_roam_limited += 1
            return
        buf = self._rx_buf
        base = VNET_HDR_LEN
        try:
            epoch.aead.decrypt_into(
                datagram[4:HEADER_BYTES],
                datagram[HEADER_BYTES:],
                datagram[:HEADER_BYTES],
                self._rx_view[base : base + length],
            )
        except InvalidTag:
            counters.drop_bad_tag += 1
            return
        window.update(counter)
        receive.confirm(epoch)
        peer.heard = time.monotonic()
        if address is not None:
            if address == peer.relayed_from:
                # through its relay: not where the peer is, so the session's own UDP endpoint
                # stays (and a punched path's datagrams beside relayed ones cost no roaming token)
                peer.relay_heard = peer.heard
            else:
                peer.udp_heard = peer.heard
                if address != peer.source:
                    peer.source = address  # roaming: the session follows its authentic datagrams
                    counters.roams += 1
        if buf[base] >> 4 != 4 or not peer.owns_source(bytes(buf[base + 12 : base + 16])):
            counters.drop_spoofed_source += 1
            return
        if csum_start and csum_start + csum_offset + 2 > length:
            counters.drop_malformed += 1
            return
        if address is not None and peer.endpoint is None:
            peer.endpoint = address  # learned from an authentic datagram
        counters.rx_packets += 1
        counters.rx_bytes += length
        if self._coalescer is not None:
            self._coalescer.push(buf, length, csum_start, csum_offset)
        elif self.tun.vnet_hdr:
            VNET_HDR.pack_into(buf, 0, NEEDS_CSUM if csum_start else 0, GSO_NONE, 0, 0, csum_start, csum_offset)
            self._write_tun(self._rx_view[: base + length])
        else:
            if csum_start:
                complete_checksum(self._rx_view[base : base + length], csum_start, csum_offset)
            self._write_tun(self._rx_view[base : base + length])

    def _write_tun(self, frame: memoryview) -> None:
        try:
            os.write(self.tun.fd, frame)
            self._counters.tun_writes += 1
        except OSError:
            self._counters.tun_errors += 1
