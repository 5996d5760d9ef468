"""Configuration of the OPC UA server (``[opcua]``) and the password hashes its users log in with.

Password hashes are PHC-style strings made by :func:`hash_password` (or
``python -m gateway.opcua_config hash-password``); the config never holds a
password in clear::

    $scrypt$ln=14,r=8,p=1$<salt>$<hash>            (default: scrypt, N = 2**ln)
    $pbkdf2-sha256$i=600000$<salt>$<hash>           (PBKDF2-HMAC-SHA256, i iterations)

``<salt>`` (16 bytes) and ``<hash>`` (32 bytes) are base64 without padding.
Both schemes use only :mod:`hashlib`.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gateway.schema import lookup_path

if TYPE_CHECKING:
    from cryptography import x509

Role = Literal["viewer", "operator", "engineer"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "engineer")

SecurityPolicy = Literal[
    "Basic256Sha256_SignAndEncrypt",
    "Basic256Sha256_Sign",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes128Sha256RsaOaep_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt",
    "Aes256Sha256RsaPss_Sign",
]
DEFAULT_POLICIES: tuple[SecurityPolicy, ...] = (
    "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Basic256Sha256_Sign",
    "Aes128Sha256RsaOaep_Sign",
)

SCRYPT_LN = 14  # N = 16384, r = 8: 16 MiB and about 50 ms per check on a desktop core
PBKDF2_ITERATIONS = 600_000
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAXMEM = 256 * 1024 * 1024
_B64 = r"[A-Za-z0-9+/]+"
_SCRYPT = re.compile(rf"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$({_B64})\$({_B64})$")
_PBKDF2 = re.compile(rf"^\$pbkdf2-sha256\$i=(\d+)\$({_B64})\$({_B64})$")
_ENDPOINT_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)*/?$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class PasswordHash:
    """A parsed password hash."""

    scheme: Literal["scrypt", "pbkdf2-sha256"]
    salt: bytes
    digest: bytes
    ln: int = 0
    r: int = 0
    p: int = 0
    iterations: int = 0

    def derive(self, password: str) -> bytes:
        secret = password.encode("utf-8")
        if self.scheme == "scrypt":
            return hashlib.scrypt(secret, salt=self.salt, n=1 << self.ln, r=self.r, p=self.p, maxmem=_MAXMEM,
                                  dklen=len(self.digest))
        return hashlib.pbkdf2_hmac("sha256", secret, self.salt, self.iterations, dklen=len(self.digest))


def parse_password_hash(encoded: str) -> PasswordHash:
    """Parse a hash made by :func:`hash_password`; ValueError says what is wrong."""
    m = _SCRYPT.match(encoded)
    try:
        if m:
            ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if not 10 <= ln <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * (1 << ln) * r * p > _MAXMEM:
                raise ValueError("scrypt parameters out of range (ln 10..20, r 1..32, p 1..16, at most 256 MiB)")
            return PasswordHash("scrypt", _unb64(m.group(4)), _unb64(m.group(5)), ln=ln, r=r, p=p)
        m = _PBKDF2.match(encoded)
        if m:
            iterations = int(m.group(1))
            if iterations < 100_000:
                raise ValueError("pbkdf2-sha256 needs at least 100000 iterations")
            return PasswordHash("pbkdf2-sha256", _unb64(m.group(2)), _unb64(m.group(3)), iterations=iterations)
    except binascii.Error:
        raise ValueError("salt or hash is not valid base64") from None
    raise ValueError("not a password hash ('$scrypt$ln=14,r=8,p=1$<salt>$<hash>' or "
                     "'$pbkdf2-sha256$i=600000$<salt>$<hash>'; make one with "
                     "`python -m gateway.opcua_config hash-password`)")


def hash_password(password: str, scheme: Literal["scrypt", "pbkdf2-sha256"] = "scrypt") -> str:
    """A new salted hash of a password, in the format the config takes."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = os.urandom(_SALT_BYTES)
    if scheme == "scrypt":
        h = PasswordHash("scrypt", salt, b"\0" * _HASH_BYTES, ln=SCRYPT_LN, r=8, p=1)
        return f"$scrypt$ln={h.ln},r={h.r},p={h.p}${_b64(salt)}${_b64(h.derive(password))}"
    h = PasswordHash("pbkdf2-sha256", salt, b"\0" * _HASH_BYTES, iterations=PBKDF2_ITERATIONS)
    return f"$pbkdf2-sha256$i={h.iterations}${_b64(salt)}${_b64(h.derive(password))}"


def verify_password(password: str, encoded: str | PasswordHash) -> bool:
    """True when the password matches the hash (constant-time comparison)."""
    h = parse_password_hash(encoded) if isinstance(encoded, str) else encoded
    return hmac.compare_digest(h.derive(password), h.digest)


@dataclass(frozen=True)
class OpcuaUser:
    """One OPC UA user: logs in with a password, an X.509 user certificate, or either."""

    name: str
    role: Role = "viewer"
    password_hash: str = ""  # from `python -m gateway.opcua_config hash-password`
    certificate: str = ""  # X.509 user certificate (PEM or DER) for certificate logins

    def check(self) -> None:
        if not self.name.strip() or self.name != self.name.strip():
            raise ValueError("name: must not be empty or have surrounding spaces")
        if not self.password_hash and not self.certificate:
            raise ValueError("password_hash: a user needs a password_hash, a certificate or both")
        if self.password_hash:
            try:
                parse_password_hash(self.password_hash)
            except ValueError as exc:
                raise ValueError(f"password_hash: {exc}") from None


@dataclass(frozen=True)
class OpcuaSection:
    """The OPC UA server for inverters and SCADA (docs/opcua.md)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # 0.0.0.0 to serve every interface
    port: int = 4840
    path: str = "/bmsgw"  # endpoint: opc.tcp://host:port/path
    application_uri: str = ""  # empty: urn:bmsgw:<gateway id>
    security: list[SecurityPolicy] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    allow_none_readonly: bool = False  # also offer security None; its sessions can only read and browse
    anonymous: bool = False  # anonymous logins (role viewer, never writes or calls)
    user: list[OpcuaUser] = field(default_factory=list)
    trusted_client_certs: list[str] = field(default_factory=list)  # files or folders of DER/PEM certificates
    accept_any_client_cert: bool = False  # skip the trust list for application certificates (not recommended)
    pack_rate_hz: float = 10.0  # pack, strings and aggregates
    cell_rate_hz: float = 1.0  # cells and modules
    scan_ms: float = 20.0  # how often the image is looked at for new samples
    slow_period_s: float = 1.0  # limits, diagnostics, alarm summary
    max_connections: int = 20
    max_queue_size: int = 100  # cap of a monitored item's queue
    max_subscriptions_per_session: int = 20
    max_monitored_items_per_session: int = 10_000  # the shipped sim site has 555 image variables, ~1,050 in all
    max_monitored_items: int = 50_000  # all sessions together
    cert_days: int = 3650  # validity of the server certificate created on first start
    cert_hostnames: list[str] = field(default_factory=list)  # extra DNS names / IPs in the server certificate

    def check(self) -> None:
        if not self.host.strip():
            raise ValueError("host: must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError("port: must be 1..65535")
        if not _ENDPOINT_PATH.match(self.path):
            raise ValueError("path: must look like /bmsgw (letters, digits, . _ ~ -)")
        if self.application_uri and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", self.application_uri):
            raise ValueError("application_uri: must be a URI such as urn:bmsgw:site1")
        if not self.security and not self.allow_none_readonly:
            raise ValueError("security: at least one policy is needed (or allow_none_readonly = true)")
        for i, p in enumerate(self.security):
            if p in self.security[:i]:
                raise ValueError(f"security[{i}]: '{p}' is listed twice")
        names = [u.name for u in self.user]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"user[{i}].name: '{n}' is used twice")
        for name, lo, hi in (("pack_rate_hz", 0.01, 100.0), ("cell_rate_hz", 0.01, 100.0)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name}: must be {lo}..{hi}")
        if not 5 <= self.scan_ms <= 1000:
            raise ValueError("scan_ms: must be 5..1000")
        if not 0.1 <= self.slow_period_s <= 60:
            raise ValueError("slow_period_s: must be 0.1..60")
        if not 1 <= self.max_connections <= 1000:
            raise ValueError("max_connections: must be 1..1000")
        if not 1 <= self.max_queue_size <= 10_000:
            raise ValueError("max_queue_size: must be 1..10000")
        if not 1 <= self.max_subscriptions_per_session <= 1000:
            raise ValueError("max_subscriptions_per_session: must be 1..1000")
        if not 1 <= self.max_monitored_items <= 1_000_000:
            raise ValueError("max_monitored_items: must be 1..1000000")
        if not 1 <= self.max_monitored_items_per_session <= self.max_monitored_items:
            raise ValueError("max_monitored_items_per_session: must be 1..max_monitored_items")
        if not 1 <= self.cert_days <= 36500:
            raise ValueError("cert_days: must be 1..36500")
        for i, h in enumerate(self.cert_hostnames):
            # a DNS name or IP address; a blank or spaced one cannot be in a certificate's subjectAltName
            if not h or any(c.isspace() for c in h):
                raise ValueError(f"cert_hostnames[{i}]: '{h}' is not a host name or IP address (empty or has spaces)")

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"opc.tcp://{host}:{self.port}{self.path if self.path != '/' else ''}"

    def resolve(self, base: Path) -> OpcuaSection:
        """Paths made absolute against the config's folder; ValueError("key: reason") when a file is missing.

        Call it while loading the config, so a missing certificate stops the start-up with exit code 2.
        """
        def one(key: str, name: str, folders: bool) -> str:
            try:
                found = lookup_path(name, (base,), folders)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            if found is None:
                raise ValueError(f"{key}: '{name}' not found (looked at {base / Path(name)})")
            return str(found)

        users = [replace(u, certificate=one(f"user[{i}].certificate", u.certificate, False)) if u.certificate else u
                 for i, u in enumerate(self.user)]
        user_certificates(users)
        trusted = [one(f"trusted_client_certs[{i}]", t, True) for i, t in enumerate(self.trusted_client_certs)]
        for i, t in enumerate(trusted):
            _parse(f"trusted_client_certs[{i}]", t)
        return replace(self, user=users, trusted_client_certs=trusted)


def user_certificates(users: Sequence[OpcuaUser]) -> dict[bytes, OpcuaUser]:
    """DER of every user certificate -> its user; ValueError("user[j].certificate: ...") for an unreadable
    certificate or one that two users share (it could log in as one of them only: a viewer's as an engineer)."""
    out: dict[bytes, OpcuaUser] = {}
    index: dict[bytes, int] = {}
    for j, u in enumerate(users):
        if u.certificate:
            der = _parse(f"user[{j}].certificate", u.certificate)[0]
            if der in index:
                raise ValueError(f"user[{j}].certificate: same certificate as user[{index[der]}]")
            out[der], index[der] = u, j
    return out


def _parse(key: str, name: str) -> list[bytes]:
    """Every certificate of a file or folder as DER; ValueError("key: 'file' is not a certificate (why)")."""
    out = []
    try:
        files = certificate_files(Path(name))
    except OSError as exc:  # a folder the gateway's user may look up but not list
        raise ValueError(f"{key}: cannot list '{name}': {exc.strerror or exc}") from None
    for f in files:
        try:
            out += [_der(c) for c in load_certificates([str(f)])]
        except (ValueError, OSError) as exc:
            raise ValueError(f"{key}: '{name if f == Path(name) else f}' is not a certificate ({exc})") from None
    return out


CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


def certificate_files(path: Path) -> list[Path]:
    """The certificate files of a folder (by suffix), or the file itself."""
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.suffix.lower() in CERT_SUFFIXES)
    return [path]


def load_certificates(paths: Iterable[str]) -> list[x509.Certificate]:
    """Certificates from files and folders (DER or PEM); ValueError for one that is not a certificate."""
    from cryptography import x509  # here, not at the top: the daemon's CLI and P0 import this module

    out = []
    for f in (f for p in paths for f in certificate_files(Path(p))):
        data = f.read_bytes()
        out.append(x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                   else x509.load_der_x509_certificate(data))
    return out


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.opcua_config hash-password [--pbkdf2]``: prints a hash for ``[[opcua.user]]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "hash-password" or any(a not in ("--pbkdf2",) for a in args[1:]):
        print("usage: python -m gateway.opcua_config hash-password [--pbkdf2]  (reads the password from the "
              "terminal, or one line from stdin)", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(password, "pbkdf2-sha256" if "--pbkdf2" in args else "scrypt"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
