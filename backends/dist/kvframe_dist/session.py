"""Authenticated sessions: what makes a captured message useless to anyone who replays it.

Every connection starts with a handshake. The connecting side sends ``hello`` with a fresh random
nonce, under the *hello key* derived from the job's secret; the accepting side answers
``hello_ack`` with a nonce of its own and an echo of the first, under the same key. Both then
derive one key per direction from the secret and both nonces, and every later message carries an
HMAC under its direction's key over its sequence number (0, 1, 2, ... on that connection) and its
frames. So a message is accepted once, in order, on the connection it was sent on, in the
direction it was sent: a replayed, reordered, reflected or altered one fails its MAC. A replayed
``hello`` opens a session whose keys the replayer cannot compute.

Without a secret (loopback jobs started by hand) the handshake still runs, with no keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

NONCE_BYTES = 16


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"kvframe-dist-v2 " + label, hashlib.sha256).digest()


def hello_key(secret: bytes | None) -> bytes | None:
    return None if secret is None else _derive(secret, b"hello")


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


@dataclass
class Session:
    send_key: bytes | None
    recv_key: bytes | None
    send_seq: int = 0
    recv_seq: int = 0

    @classmethod
    def derive(cls, secret: bytes | None, client_nonce: str, server_nonce: str, client: bool) -> Session:
        """The keys of one connection; ``client`` is the side that connected."""
        if secret is None:
            return cls(None, None)
        both = f"{client_nonce}:{server_nonce}".encode()
        c2s, s2c = _derive(secret, b"c2s " + both), _derive(secret, b"s2c " + both)
        return cls(c2s, s2c) if client else cls(s2c, c2s)
