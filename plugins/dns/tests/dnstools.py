"""Helpers of the DNS plugin's tests: ``dig`` as a subprocess and a small upstream DNS server.

The upstream is the test's own (dnspython on loopback), never the internet: it answers
``*.up.example.`` with A 192.0.2.<n> (TTL 300) and NXDOMAIN for everything else, and counts the
queries it got, so a test sees what the plugin forwarded and what it answered from its cache.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading

import dns.message
import dns.rcode
import dns.rrset

DIG = shutil.which("dig")
NEEDS_DIG = "needs dig (Debian package dnsutils)"


async def dig(port: int, *args: str, server: str = "127.0.0.1") -> str:
    """dig's output (``+short`` etc. in ``args``); without blocking the loop that serves it."""
    assert DIG is not None
    process = await asyncio.create_subprocess_exec(
        DIG,
        f"@{server}",
        "-p",
        str(port),
        "+tries=1",
        "+time=5",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return out.decode()


def status(output: str) -> str:
    """The ``status:`` of a full dig answer (NOERROR, NXDOMAIN, ...)."""
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig's output:\n{output}")


class Upstream:
    """A UDP DNS server on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Upstream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text().lower()
            self.queries.append(name)
            response = dns.message.make_response(query)
            if name.endswith(".up.example."):
                last = sum(name.encode()) % 250 + 1
                response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "A", f"192.0.2.{last}"))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(dns.rrset.from_text("example.", 300, "IN", "SOA", "ns.example. h.example. 1 2 3 4 120"))
            self.sock.sendto(response.to_wire(), addr)


def serve_forever(host: str, port: int) -> None:
    """``python dnstools.py HOST PORT``: the upstream as a process (in a test's namespace)."""
    server = Upstream.__new__(Upstream)
    server.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    server.sock.bind((host, port))
    server.sock.settimeout(0.2)
    server.port, server.queries, server._stop = port, [], threading.Event()
    print("ready", flush=True)
    server._serve()


if __name__ == "__main__":
    import sys

    serve_forever(sys.argv[1], int(sys.argv[2]))
