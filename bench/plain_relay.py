"""The least a userspace VPN hop can do: TUN ⇄ UDP, one packet per syscall, no sealing.

Run by ``bench/vpn.py`` in each namespace of the pair to measure the latency floor of *any*
Python forwarder on this machine (thread wake-ups, cold caches after idle, TUN and UDP paths), so
that the data plane's added RTT can be split into what the platform costs and what sealing and
batching add. Not a VPN: nothing is encrypted or checked.

Usage: ``python bench/plain_relay.py <tun name> <vip/prefix> <local underlay ip> <peer underlay ip> <port>``;
prints ``ready`` once the device is up, and runs until stdin closes.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading

from kairos_plugin_tunvpn.tun import TunDevice


def relay(tun_fd: int, sock: socket.socket, wake_fd: int) -> None:
    """Move packets both ways in one thread until ``wake_fd`` becomes readable."""
    poller = select.poll()
    for fd in (tun_fd, sock.fileno(), wake_fd):
        poller.register(fd, select.POLLIN)
    while True:
        busy = False
        try:
            sock.send(os.read(tun_fd, 65536))
            busy = True
        except (BlockingIOError, ConnectionRefusedError):
            pass
        try:
            os.write(tun_fd, sock.recv(65536))
            busy = True
        except (BlockingIOError, ConnectionRefusedError):
            pass
        if not busy:
            if any(fd == wake_fd for fd, _ in poller.poll(500)):
                return


def main(argv: list[str]) -> int:
    name, address, local, peer, port = argv
    tun = TunDevice.create(name, address=address, mtu=1420, offload=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local, int(port)))
    sock.connect((peer, int(port)))
    sock.setblocking(False)
    os.set_blocking(tun.fd, False)
    wake_r, wake_w = os.pipe()
    thread = threading.Thread(target=relay, args=(tun.fd, sock, wake_r), daemon=True)
    thread.start()
    print("ready", flush=True)
    sys.stdin.read()
    os.write(wake_w, b"x")
    thread.join(timeout=5)
    tun.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
