"""Separate "hosts" for the cluster test: Linux network namespaces, else loopback addresses.

As root with iproute2, each worker host is a network namespace joined to the
test's own namespace (the broker and PostgreSQL "host") by a veth pair:
worker host ``i`` is ``10.N.i.2``, and reaches the broker host at
``10.N.i.1``, with ``N`` a second octet no address or route on the machine
uses yet (so concurrent runs, and the machine's own networks, do not clash).
A second veth pair per host, ``10.N.(100+i).0/24``, carries the database
traffic (:meth:`Hosts.db_side`), so that a host can be cut off from the
brokers alone (``partition(i, database=False)``). :meth:`Hosts.partition` takes the pair's link down (nothing
passes either way, TCP connections stay open) and :meth:`Hosts.heal` brings it
back. Everything created is removed by :meth:`Hosts.close`, even after a
failure. Without root (or ``ip``), worker host ``i`` is ``127.0.0.(i+1)`` on
the loopback interface and :attr:`Hosts.netns` is False: a partition can then
only be simulated (the test freezes the process instead). Setting
``ZRPC_TEST_LOOPBACK_HOSTS=1`` chooses loopback addresses even as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["Hosts"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


class Hosts:
    """``count`` worker hosts (see the module docstring)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.netns = False
        self.why_not = ""
        self._tag = f"{os.getpid() % 46656:03x}"  # short: interface names have 15 characters
        self._made: list[tuple[str, list[str]]] = []  # (namespace, root-side links)
        self._net = 0  # the second octet of this run's 10.N.i.0/24 links
        if os.geteuid() != 0 or shutil.which("ip") is None:
            self.why_not = "network namespaces need root and iproute2"
            return
        if os.environ.get("ZRPC_TEST_LOOPBACK_HOSTS") == "1":
            self.why_not = "ZRPC_TEST_LOOPBACK_HOSTS=1"
            return
        try:
            self._net = self._free_octet()
            for i in range(1, count + 1):
                self._make(i)
            self.netns = True
        except (subprocess.SubprocessError, OSError) as exc:
            self.why_not = f"cannot create network namespaces: {exc}"
            self.close()

    def _free_octet(self) -> int:
        """A second octet N such that nothing on the machine uses 10.N.0.0/16 yet."""
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
        used += subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=10).stdout
        start = os.getpid() % 150
        for k in range(150):
            n = 100 + (start + k) % 150
            if f" 10.{n}." not in used and f"\n10.{n}." not in "\n" + used:
                return n
        raise OSError("no free 10.N.0.0/16 for the test's network namespaces")

    def _make(self, i: int) -> None:
        ns = f"zq{self._tag}w{i}"
        _ip("netns", "add", ns)
        links: list[str] = []
        self._made.append((ns, links))
        for side, subnet in (("a", i), ("d", 100 + i)):  # brokers' link, database link
            a, b = f"zq{self._tag}{i}{side}", f"zq{self._tag}{i}{side}p"
            _ip("link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
            links.append(a)
            _ip("addr", "add", f"10.{self._net}.{subnet}.1/24", "dev", a)
            _ip("link", "set", a, "up")
            _ip("-n", ns, "addr", "add", f"10.{self._net}.{subnet}.2/24", "dev", b)
            _ip("-n", ns, "link", "set", b, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def broker_side(self, i: int) -> str:
        """The broker host's address as worker host ``i`` reaches it."""
        return f"10.{self._net}.{i}.1" if self.netns else "127.0.0.1"

    def db_side(self, i: int) -> str:
        """The database's address as worker host ``i`` reaches it."""
        return f"10.{self._net}.{100 + i}.1" if self.netns else "127.0.0.1"

    def db_addresses(self) -> tuple[str, ...]:
        """Every address of the database that worker hosts use (besides loopback)."""
        return tuple(self.db_side(i) for i in range(1, self.count + 1)) if self.netns else ()

    def address(self, i: int) -> str:
        """Worker host ``i``'s own address."""
        return f"10.{self._net}.{i}.2" if self.netns else f"127.0.0.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        """argv prefix running a command on worker host ``i``."""
        return ["ip", "netns", "exec", f"zq{self._tag}w{i}"] if self.netns else []

    def partition(self, i: int, database: bool = True) -> None:
        """Cut worker host ``i`` off from the brokers, and from the database too by default."""
        for side in ("a", "d") if database else ("a",):
            _ip("link", "set", f"zq{self._tag}{i}{side}", "down")

    def heal(self, i: int) -> None:
        for side in ("a", "d"):
            _ip("link", "set", f"zq{self._tag}{i}{side}", "up")

    def close(self) -> None:
        for ns, links in reversed(self._made):
            for link in links:
                subprocess.run(["ip", "link", "del", link], timeout=10, capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], timeout=10, capture_output=True)
        self._made.clear()
