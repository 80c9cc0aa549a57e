"""The network token: the one shared secret that makes machines one network.

It is base64 (standard alphabet) of a YAML document in the shape EdgeVPN and Kairos generate::

    otp:
      dht:    {interval: 360, key: <43 chars>, length: 43}
      crypto: {interval: 360, key: <43 chars>, length: 43}
    room: <43 chars>
    rendezvous: <43 chars>
    mdns: <43 chars>
    max_message_size: 20971520

Users hold both the base64 and the raw YAML form, so :func:`parse_token` accepts either. Tokens made
by EdgeVPN or Kairos parse unchanged (Kairos uses the maximum int64 as interval: never rotating).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import secrets
import string
from dataclasses import dataclass

import yaml

from .errors import TokenError
from .untrusted import nesting_exceeds

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 43
DEFAULT_INTERVAL = 360
DEFAULT_MAX_MESSAGE_SIZE = 20 * 1024 * 1024
# Below this the ledger could not replicate (sync frames and delta batches need room).
MIN_MESSAGE_SIZE = 64 * 1024
# A real token is ~400 bytes; anything far larger is a mistake (a pasted file, a binary), and
# parsing it would only waste memory.
MAX_TOKEN_BYTES = 64 * 1024
# A token is three levels deep (otp.dht.key); anything much deeper is not one, and deep input
# would only cost stack further on.
MAX_TOKEN_DEPTH = 8
# Integer fields hold what EdgeVPN reads them into (int64; Kairos's never-rotating interval is
# the maximum), so a larger number is a mistake that would only overflow there.
MAX_TOKEN_INT = 2**63 - 1


@dataclass(frozen=True)
class OTPSpec:
    """One OTP seed: the key, how many seconds a window lasts, and the OTP length (EdgeVPN's)."""

    interval: int
    key: str
    length: int


@dataclass(frozen=True)
class NetworkToken:
    """A parsed network token."""

    dht: OTPSpec
    crypto: OTPSpec
    room: str
    rendezvous: str
    mdns: str
    max_message_size: int

    def to_document(self) -> dict:
        """The YAML document, field for field as EdgeVPN writes it."""
        return {
            "otp": {
                "dht": {"interval": self.dht.interval, "key": self.dht.key, "length": self.dht.length},
                "crypto": {"interval": self.crypto.interval, "key": self.crypto.key, "length": self.crypto.length},
            },
            "room": self.room,
            "rendezvous": self.rendezvous,
            "mdns": self.mdns,
            "max_message_size": self.max_message_size,
        }

    def to_yaml(self) -> str:
        """The raw YAML form (what ``edgevpn -g`` prints)."""
        return yaml.safe_dump(self.to_document(), sort_keys=False)

    def encode(self) -> str:
        """The base64 form users paste into configs."""
        return base64.b64encode(self.to_yaml().encode()).decode()

    @functools.cached_property  # the token is frozen; a YAML dump per call was 6 % of a busy node's CPU
    def fingerprint(self) -> str:
        """A short, non-secret digest: two machines hold the same token iff fingerprints match."""
        canonical = yaml.safe_dump(self.to_document(), sort_keys=True).encode()
        return hashlib.sha256(b"kairos/v1/token-fingerprint\0" + canonical).hexdigest()[:16]

    def masked(self) -> dict:
        """The document with every secret masked, for display."""
        doc = self.to_document()
        for section in ("dht", "crypto"):
            doc["otp"][section]["key"] = mask_secret(doc["otp"][section]["key"])
        for field in ("room", "rendezvous", "mdns"):
            doc[field] = mask_secret(doc[field])
        return doc


def mask_secret(secret: str) -> str:
    """Show enough of a secret to tell two apart by eye, never enough to use it."""
    if len(secret) <= 8:
        return "*" * len(secret)
    return f"{secret[:3]}…({len(secret)} chars)"


def random_key(length: int = KEY_LENGTH) -> str:
    """A random key from [a-zA-Z0-9], as EdgeVPN generates them (~256 bits at 43 chars)."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))


def generate_token(interval: int = DEFAULT_INTERVAL, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> NetworkToken:
    """A new token with fresh random secrets."""
    if interval <= 0:
        raise TokenError(f"interval must be a positive number of seconds, not {interval}")
    return NetworkToken(
        dht=OTPSpec(interval, random_key(), KEY_LENGTH),
        crypto=OTPSpec(interval, random_key(), KEY_LENGTH),
        room=random_key(),
        rendezvous=random_key(),
        mdns=random_key(),
        max_message_size=max_message_size,
    )


def rotated_token(token: NetworkToken) -> NetworkToken:
    """The successor of ``token`` (``kairos token rotate``): fresh secrets for admission, sealing and
    the rendezvous (``otp.crypto.key``, ``otp.dht.key``), everything else kept — the room, so the
    gossip topic stays and nodes holding either token meet during the grace window."""
    return NetworkToken(
        dht=OTPSpec(token.dht.interval, random_key(), KEY_LENGTH),
        crypto=OTPSpec(token.crypto.interval, random_key(), KEY_LENGTH),
        room=token.room,
        rendezvous=token.rendezvous,
        mdns=token.mdns,
        max_message_size=token.max_message_size,
    )


def parse_token(text: str | bytes) -> NetworkToken:
    """Parse a token in base64 or raw YAML form; :class:`TokenError` names what is wrong."""
    if isinstance(text, bytes):
        if len(text) > MAX_TOKEN_BYTES:
            raise TokenError(f"token is too large ({len(text)} bytes; a token is under {MAX_TOKEN_BYTES})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("token is not text (not UTF-8)") from None
    if len(text) > MAX_TOKEN_BYTES:
        raise TokenError(f"token is too large ({len(text)} characters; a token is under {MAX_TOKEN_BYTES})")
    text = text.strip()
    if not text:
        raise TokenError("token is empty")
    document = _load_document(text)
    return _token_from_document(document)


def _load_document(text: str) -> dict:
    # The raw YAML form is recognisable by its top-level key; anything else must be base64.
    if text.startswith(("otp:", "{", "---")) or "\notp:" in text:
        return _load_yaml(text, "token YAML")
    compact = "".join(text.split())  # tolerate a token wrapped over lines
    padded = compact + "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        try:  # some tools emit the URL-safe alphabet
            raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise TokenError("token is neither base64 nor YAML") from None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError("token decodes from base64 to binary data, not YAML") from None
    return _load_yaml(decoded, "decoded token")


def _load_yaml(text: str, what: str) -> dict:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TokenError(f"{what} is not valid YAML{where}") from None
    except RecursionError:  # the parser recurses once per level of [ or {
        raise TokenError(f"{what} is nested too deeply to be a token") from None
    except ValueError:  # a constructor's own check: an integer over 4300 digits, a 13th month
        raise TokenError(f"{what} is not valid YAML (a value no YAML type can hold)") from None
    if not isinstance(document, dict):
        raise TokenError(f"{what} is not a YAML mapping with otp, room, rendezvous and mdns")
    if nesting_exceeds(document, MAX_TOKEN_DEPTH):
        raise TokenError(f"{what} is nested more than {MAX_TOKEN_DEPTH} levels deep; a token is 3")
    return document


def _token_from_document(doc: dict) -> NetworkToken:
    otp = doc.get("otp")
    if otp is None:
        raise TokenError("token has no 'otp' section")
    if not isinstance(otp, dict):
        raise TokenError("token field 'otp' must be a mapping")
    specs = {name: _otp_spec(otp, name) for name in ("dht", "crypto")}
    strings = {name: _string_field(doc, name) for name in ("room", "rendezvous", "mdns")}
    max_message_size = doc.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
    if max_message_size in (None, 0):  # EdgeVPN treats 0/absent as its default
        max_message_size = DEFAULT_MAX_MESSAGE_SIZE
    if not _is_int(max_message_size) or not MIN_MESSAGE_SIZE <= max_message_size <= MAX_TOKEN_INT:
        raise TokenError(
            f"token field 'max_message_size' must be an integer from {MIN_MESSAGE_SIZE} to {MAX_TOKEN_INT}, "
            f"not {_shown(max_message_size)}"
        )
    return NetworkToken(max_message_size=max_message_size, **specs, **strings)


def _otp_spec(otp: dict, name: str) -> OTPSpec:
    section = otp.get(name)
    if section is None:
        raise TokenError(f"token has no 'otp.{name}' section")
    if not isinstance(section, dict):
        raise TokenError(f"token field 'otp.{name}' must be a mapping")
    interval = section.get("interval")
    if interval is None:
        raise TokenError(f"token field 'otp.{name}.interval' is missing")
    if not _is_int(interval):
        raise TokenError(f"token field 'otp.{name}.interval' must be an integer, not {type(interval).__name__}")
    if interval <= 0:
        raise TokenError(f"token field 'otp.{name}.interval' must be positive, not {_shown(interval)}")
    if interval > MAX_TOKEN_INT:
        raise TokenError(f"token field 'otp.{name}.interval' must be at most {MAX_TOKEN_INT}, not {_shown(interval)}")
    key = _string_field(section, "key", f"otp.{name}.")
    length = section.get("length", KEY_LENGTH)
    if not _is_int(length) or not 0 < length <= MAX_TOKEN_INT:
        raise TokenError(
            f"token field 'otp.{name}.length' must be a positive integer up to {MAX_TOKEN_INT}, not {_shown(length)}"
        )
    return OTPSpec(interval=interval, key=key, length=length)


def _string_field(doc: dict, name: str, prefix: str = "") -> str:
    value = doc.get(name)
    if value is None:
        raise TokenError(f"token field '{prefix}{name}' is missing")
    if _is_int(value):  # YAML reads an all-digit random key as a number
        value = str(value)
    if not isinstance(value, str):
        raise TokenError(f"token field '{prefix}{name}' must be a string, not {type(value).__name__}")
    if not value.strip():
        raise TokenError(f"token field '{prefix}{name}' is empty")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    # An error names the value it refuses, but never thousands of characters of it.
    if _is_int(value) and abs(value) > MAX_TOKEN_INT:  # type: ignore[arg-type]
        return f"an integer of {value.bit_length()} bits"  # type: ignore[union-attr]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
