"""Rotating the network token: ``kairos token rotate`` on the leader, and every member switching.

1. The leader makes a successor token (:func:`~kairos_core.token.rotated_token`: new admission,
   sealing and rendezvous secrets, the same room) and writes, for every attested member alive
   now or within the quorum horizon (offline ones included; never a revoked peer, nor an identity
   nobody admitted: an insider's made-up ones would get the token) one record in the core bucket
   ``rotation``::

       rotation/<member>:<leader> = {"member", "by", "epoch", "fingerprint", "replaces",
                                     "grace_until", "eph", "nonce", "box"}

   ``box`` is the new token sealed to that member alone: AES-256-GCM under
   ``HKDF(X25519(eph, member's box key))``, with every other field as associated data. The
   member's box key is an X25519 key derived from its identity seed (:func:`box_key`); it
   publishes the public half in its own ``nodes`` entry (``box``), which its identity signs. Why
   this key and not the admission session's: anything derived from the admission handshake is
   derived from the token, which the peers we are shutting out hold too; the libp2p identity is
   an ed25519 *signing* key, which cannot do key agreement, so the box key is derived from the same
   seed, and bound to the identity by the signed entry. Sealing to it, not to a live stream, lets
   the record wait in the ledger for a member that is offline: it gets its copy by the ledger sync
   that follows its admission (with the old token, still accepted during the grace window).
2. Records travel like any ledger entry, over admitted streams and sealed gossip. A record counts
   only when its writer led the epoch it names (as revocations: :mod:`kairos_core.revocation`), it
   replaces the token this node holds, and its box opens to the token it names.
3. Every node that switches keeps accepting the old token until ``grace_until`` (the leader's
   ``p2p.token_grace`` after the rotation): admission proofs, sealed frames and rendezvous names
   of both (:class:`~kairos_core.keys.KeySchedule`). It seals, proves and announces with the new
   one at once, and persists it in its state dir (``network_token.json``, 0600).

Which token a node starts with: the state dir's rotated token when the config's token is one it
replaced (the config file is not rewritten: it may be managed elsewhere), else the config's (an
operator who put a new token there meant it). Both choices are logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .election import MAX_EPOCH
from .errors import KairosError, TokenError
from .identity import Identity
from .keys import KeySchedule, derive
from .revocation import is_peer_id
from .token import NetworkToken, parse_token, rotated_token

log = logging.getLogger(__name__)

ROTATION_BUCKET = "rotation"
STATE_FILE = "network_token.json"
LABEL_BOX_KEY = b"kairos/v1/rotation/x25519"
LABEL_BOX = b"kairos/v1/rotation/box"
NONCE_BYTES = 12
# A grace window a record may ask for at most (a member caps what it is told).
MAX_GRACE = 30 * 24 * 3600.0
# A sealed token is ~500 bytes; a record's box longer than this is not one.
MAX_BOX = 4096


def box_key(identity: Identity) -> X25519PrivateKey:
    """This node's X25519 key for sealed tokens, derived from its identity seed."""
    return X25519PrivateKey.from_private_bytes(derive(identity.seed, LABEL_BOX_KEY))


def box_public(identity: Identity) -> str:
    """The public half, as published in the node's ``nodes`` entry (base64)."""
    raw = box_key(identity).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _b64(text: Any, size: int | None = None, limit: int = MAX_BOX) -> bytes | None:
    if not isinstance(text, str) or len(text) > limit * 2:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if size is None or len(raw) == size else None


@dataclass(frozen=True)
class Rotation:
    """One record of the ``rotation`` bucket: a successor token sealed to one member."""

    member: str
    by: str
    epoch: int
    fingerprint: str
    replaces: str
    grace_until: float
    eph: bytes
    nonce: bytes
    box: bytes

    def associated_data(self) -> bytes:
        """What the box authenticates besides the token (every other field)."""
        return json.dumps(
            [
                self.member,
                self.by,
                self.epoch,
                self.fingerprint,
                self.replaces,
                self.grace_until,
                base64.b64encode(self.eph).decode(),
            ]
        ).encode()


def parse_rotation(key: str, value: Any, owner: str) -> Rotation | None:
    """The record under ``key`` written by ``owner``, or None when it is malformed."""
    if not isinstance(value, dict) or not key.endswith(":" + owner):
        return None
    member = key[: -len(owner) - 1]
    if value.get("member") != member or value.get("by") != owner or not is_peer_id(member):
        return None
    epoch, grace_until = value.get("epoch"), value.get("grace_until")
    fingerprint, replaces = value.get("fingerprint"), value.get("replaces")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        return None
    if isinstance(grace_until, bool) or not isinstance(grace_until, (int, float)) or not 0 <= grace_until < 1e11:
        return None
    if not (isinstance(fingerprint, str) and isinstance(replaces, str) and len(fingerprint) == len(replaces) == 16):
        return None
    eph, nonce, box = _b64(value.get("eph"), 32), _b64(value.get("nonce"), NONCE_BYTES), _b64(value.get("box"))
    if eph is None or nonce is None or box is None:
        return None
    return Rotation(member, owner, epoch, fingerprint, replaces, float(grace_until), eph, nonce, box)


def _box_cipher(shared: bytes, eph: bytes, member_public: bytes) -> AESGCM:
    return AESGCM(derive(shared + eph + member_public, LABEL_BOX))


def seal_token(
    token: NetworkToken, member: str, member_box: str, *, by: str, epoch: int, replaces: str, grace_until: float
) -> dict[str, Any]:
    """The record value sealing ``token`` to ``member`` (its published box key)."""
    public = _b64(member_box, 32)
    if public is None:
        raise ValueError(f"{member} publishes no valid box key")
    eph_key = X25519PrivateKey.generate()
    eph = eph_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = eph_key.exchange(X25519PublicKey.from_public_bytes(public))
    nonce = os.urandom(NONCE_BYTES)
    record = Rotation(member, by, epoch, token.fingerprint, replaces, round(grace_until, 3), eph, nonce, b"")
    box = _box_cipher(shared, eph, public).encrypt(nonce, token.encode().encode(), record.associated_data())
    return {
        "member": member,
        "by": by,
        "epoch": epoch,
        "fingerprint": token.fingerprint,
        "replaces": replaces,
        "grace_until": record.grace_until,
        "eph": base64.b64encode(eph).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "box": base64.b64encode(box).decode(),
    }


def open_token(record: Rotation, identity: Identity) -> NetworkToken:
    """The token sealed in ``record`` for this identity; :class:`TokenError` when it does not open
    or is not the token the record names."""
    key = box_key(identity)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(record.eph))
        text = _box_cipher(shared, record.eph, public).decrypt(record.nonce, record.box, record.associated_data())
    except (InvalidTag, ValueError):
        raise TokenError("the sealed token does not open with this node's key") from None
    token = parse_token(text)
    if token.fingerprint != record.fingerprint:
        raise TokenError("the sealed token is not the one the record names")
    return token


# -- the state dir -------------------------------------------------------------------------------


def save_state(state_dir: Path, schedule: KeySchedule, replaced: list[str]) -> None:
    """Persist the current token (and the replaced one while its grace lasts), 0600, atomically."""
    previous = schedule.previous()
    doc = {
        "token": schedule.token.encode(),
        "replaced": replaced[-64:],
        "previous": previous.encode() if previous else None,
        "grace_until": schedule.grace_until,
    }
    path = Path(state_dir) / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(doc, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def schedule_at_start(
    config_token: NetworkToken,
    state_dir: Path,
    clock: Callable[[], float] = time.time,
) -> tuple[KeySchedule, list[str]]:
    """The key schedule a node starts with, and the fingerprints its token replaced (see the
    module docstring for which token wins; the choice is logged)."""
    path = Path(state_dir) / STATE_FILE
    try:
        doc = json.loads(path.read_text())
        token = parse_token(doc["token"])
        replaced = [fp for fp in doc.get("replaced", []) if isinstance(fp, str)]
        previous = parse_token(doc["previous"]) if doc.get("previous") else None
        grace_until = float(doc.get("grace_until", 0))
    except FileNotFoundError:
        return KeySchedule(config_token, clock), []
    except (OSError, ValueError, KeyError, TypeError, TokenError) as exc:
        log.error("ignoring %s (%s): using the config's token %s", path, exc, config_token.fingerprint)
        return KeySchedule(config_token, clock), []
    if config_token.fingerprint not in replaced and config_token != token:
        log.warning(
            "the state dir holds the rotated token %s, but the config's token %s is not one it replaced: using the config's",
            token.fingerprint,
            config_token.fingerprint,
        )
        return KeySchedule(config_token, clock), []
    if config_token != token:
        log.warning(
            "using the rotated network token %s from %s: it replaced the config's %s (the config file is not rewritten)",
            token.fingerprint,
            path,
            config_token.fingerprint,
        )
    if previous is not None and clock() < grace_until and previous.room == token.room:
        schedule = KeySchedule(previous, clock)
        schedule.rotate(token, grace_until)
        return schedule, replaced
    return KeySchedule(token, clock), replaced


class Rotator:
    """Writes rotations on the leader and adopts the ones addressed to this node.

    :param members: ``() -> {peer id: box key}`` of the members to hand a new token to.
    :param lease_holder: ``epoch -> peer id | None`` (who led an epoch).
    :param on_rotated: called with the new token once this node switched.
    :param current_epoch: ``() -> epoch | None``, the highest epoch this node knows: a record counts
        only when it names that epoch or the one before.
    """

    def __init__(
        self,
        identity: Identity,
        ledger: Any,
        schedule: KeySchedule,
        state_dir: Path,
        replaced: list[str],
        *,
        lease_holder: Callable[[int], str | None],
        members: Callable[[], dict[str, str]],
        on_rotated: Callable[[NetworkToken], None],
        current_epoch: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.identity = identity
        self.self_id = identity.peer_id
        self.ledger = ledger
        self.schedule = schedule
        self.state_dir = Path(state_dir)
        self.replaced = list(replaced)
        self.lease_holder = lease_holder
        self.current_epoch = current_epoch
        self.members = members
        self.on_rotated = on_rotated
        #: records addressed to us that did not open or did not count
        self.refused = 0
        self._refused_keys: set[tuple[str, tuple]] = set()
        self._pending_adopt: tuple[NetworkToken, float] | None = None

    def rotate(self, leader: tuple[str, int] | None, grace: float, *, adopt: bool = True) -> dict[str, Any]:
        """On the leader: a new token for every member, then switch; a summary for the operator.

        With ``adopt=False`` the switch waits for :meth:`adopt_pending`: the node calls it once the
        sealed copies have been published — gossip is sealed when it is sent, not when it is
        written, and sealed under the new key the copies would reach no member (none holds it yet).
        """
        if leader is None:
            raise KairosError("no leader yet: only the leader may rotate the token; try again once one is elected")
        holder, epoch = leader
        if holder != self.self_id:
            raise KairosError(f"only the leader may rotate the token: the leader is {holder} (epoch {epoch}); run this there")
        if self._pending_adopt is not None:
            raise KairosError("a rotation is being published: try again in a few seconds")
        if self.schedule.previous() is not None:
            # the schedule keeps one replaced token: a second rotation now would strand a member
            # that is offline with the first token and comes back inside its window
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.schedule.grace_until))
            raise KairosError(
                f"a rotation is still in its grace window (the token it replaced is accepted until {until}): "
                "rotate again after that"
            )
        old = self.schedule.token
        new = rotated_token(old)
        grace_until = time.time() + grace
        members = {peer: box for peer, box in self.members().items() if peer != self.self_id}
        # Seal every copy before writing any: a member whose published box key is unusable is
        # skipped and reported, and cannot leave the network half rotated.
        sealed: dict[str, dict[str, Any]] = {}
        unkeyed: dict[str, str] = {}
        for member, box in sorted(members.items()):
            try:
                sealed[member] = seal_token(
                    new, member, box, by=self.self_id, epoch=epoch, replaces=old.fingerprint, grace_until=grace_until
                )
            except (ValueError, TypeError) as exc:  # cryptography refuses low-order points with ValueError
                unkeyed[member] = str(exc) or type(exc).__name__
                log.warning("token rotation: %s gets no copy of the new token: %s", member, unkeyed[member])
        for member, value in sealed.items():
            self.ledger.set(ROTATION_BUCKET, f"{member}:{self.self_id}", value)
        if adopt:
            self._adopt(new, grace_until)
        else:
            self._pending_adopt = (new, grace_until)
        return {
            "fingerprint": new.fingerprint,
            "replaces": old.fingerprint,
            "members": sorted(sealed),
            "unkeyed": unkeyed,
            "grace_until": round(grace_until, 3),
            "epoch": epoch,
        }

    def adopt_pending(self) -> None:
        """Switch to the token :meth:`rotate` wrote with ``adopt=False`` (once; later calls do nothing)."""
        pending, self._pending_adopt = self._pending_adopt, None
        if pending is not None:
            self._adopt(*pending)

    def refresh(self) -> bool:
        """Adopt a record addressed to this node that replaces the token it holds; True if it did."""
        current = self.schedule.token.fingerprint
        prefix = self.self_id + ":"
        for key in list(self.ledger.items(ROTATION_BUCKET)):
            if not key.startswith(prefix):
                continue
            entry = self.ledger.get_entry(ROTATION_BUCKET, key)
            if entry is None or entry.deleted:
                continue
            record = parse_rotation(entry.key, entry.value, entry.owner)
            if record is None or record.replaces != current or record.fingerprint == current:
                continue
            marker = (key, tuple(entry.version))
            if marker in self._refused_keys:
                continue
            if self.lease_holder(record.epoch) != record.by:
                continue  # not (yet) credible: looked at again later
            current_epoch = self.current_epoch()
            if current_epoch is not None and record.epoch < current_epoch - 1:
                # a node that once led keeps its key: a record in the name of an old epoch, written
                # any time later, must not move members to a token of its choosing
                continue
            try:
                token = open_token(record, self.identity)
                grace_until = min(record.grace_until, time.time() + MAX_GRACE)
                self._adopt(token, grace_until)
            except (TokenError, ValueError) as exc:
                self.refused += 1
                self._refused_keys.add(marker)
                log.warning("rotation record from %s not adopted: %s", record.by, exc)
                continue
            return True
        return False

    def _adopt(self, token: NetworkToken, grace_until: float) -> None:
        old = self.schedule.token
        self.schedule.rotate(token, grace_until)
        if old.fingerprint not in self.replaced:
            self.replaced.append(old.fingerprint)
        save_state(self.state_dir, self.schedule, self.replaced)
        log.warning(
            "network token rotated: now %s, the replaced %s accepted until %s (saved in %s)",
            token.fingerprint,
            old.fingerprint,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(grace_until)),
            self.state_dir / STATE_FILE,
        )
        self.on_rotated(token)
