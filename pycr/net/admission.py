"""How many connections to serve's port may be in their greeting at once, in all and per peer.

A connection costs a thread and up to the frame timeout until its peer has
said hello and proved the secret. serve bounds them (MAX_GREETING in all),
so a flood cannot exhaust it; but then one host that opens that many and
stalls in each kept every other peer out, the real source included, and in
a post-copy phase a source kept out leaves its replica to be killed. Each
peer address may hold only MAX_PER_PEER greetings at once: a source needs
one, and a second while an old one is given up.
"""

import threading

MAX_GREETING = 16       # in their greeting at once, in all
MAX_PER_PEER = 4        # of which from one peer address


class Admission:
    """Connections in their greeting, counted; admit() before a greeting's thread, release() after."""

    def __init__(self, total=MAX_GREETING, per_peer=MAX_PER_PEER):
        self.total, self.per_peer = total, per_peer
        self._lock = threading.Lock()
        self._by_peer = {}

    def admit(self, chan):
        """-> None if chan may be greeted (counted from now), else why not (one line)."""
        peer = peer_host(chan)
        with self._lock:
            if sum(self._by_peer.values()) >= self.total:
                return f"{self.total} connections are being greeted"
            if self._by_peer.get(peer, 0) >= self.per_peer:
                return f"{self.per_peer} connections from {peer} are being greeted"
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        return None

    def release(self, chan):
        peer = peer_host(chan)
        with self._lock:
            left = self._by_peer.get(peer, 0) - 1
            if left > 0:
                self._by_peer[peer] = left
            else:
                self._by_peer.pop(peer, None)


def peer_host(chan):
    """The peer's address (no port), as accept() saw it."""
    return chan.peer_address[0] if chan.peer_address else "?"
