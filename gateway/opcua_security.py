"""Who may connect to the OPC UA server and what they may do.

Users from the config (password, X.509 user certificate, anonymous) and their roles; the
trust list of client application certificates; the server's own certificate; and a
permission ruleset per secure channel (knows its security mode, keeps None read-only or
discovery-only) that records who asks, so that the server's attribute service and methods
(gateway/opcua_server.py) can check the caller's role for every operation.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyFactory, SecurityPolicyNone
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.opcua_config import (
    ROLES,
    OpcuaSection,
    OpcuaUser,
    load_certificates,
    parse_password_hash,
    verify_password,
)
from gateway.opcua_nodes import status_code

log = logging.getLogger(__name__)

ROLE_RANK: dict[str, int] = {r: k for k, r in enumerate(ROLES)}

# password checks not remembered as good: a burst of VERIFY_BURST, then one per VERIFY_REFILL_S
VERIFY_BURST = 3
VERIFY_REFILL_S = 2.0
THROTTLE_LOG_S = 10.0


# -- request context: who is calling, on what channel -----------------------------------------


@dataclass
class OpcuaIdentity(User):
    """An authenticated OPC UA user (asyncua role is always User: Admin would bypass every check)."""

    bms_role: str = "viewer"
    method: str = "anonymous"  # password, certificate or anonymous


@dataclass(frozen=True)
class Request:
    """Who is calling (None: not one of our users) and on what kind of channel; set per request."""

    user: OpcuaIdentity | None
    read_only: bool  # the channel has security None


_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("bmsgw_opcua_request", default=None)
_X509_TOKEN: contextvars.ContextVar[bool] = contextvars.ContextVar("bmsgw_opcua_x509", default=False)
_SESSION: contextvars.ContextVar[ua.NodeId | None] = contextvars.ContextVar("bmsgw_opcua_session", default=None)

_USER_SERVICES = frozenset(ua.NodeId(cast(Any, t)) for t in USER_TYPES)
_MUTATING = frozenset(ua.NodeId(cast(Any, t)) for t in (ua.ObjectIds.WriteRequest_Encoding_DefaultBinary,
                                                         ua.ObjectIds.CallRequest_Encoding_DefaultBinary,
                                                         ua.ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary))


class _ChannelRules(PermissionRuleset):
    """Permission ruleset of one secure channel; also records who asks, for the per-item checks.

    A secured channel must use a trusted client certificate for every request: asyncua checks
    the trust list only against the certificate a client *declares* in CreateSession (and not
    at all when it declares none), while the channel is protected by the one it opened with.
    """

    def __init__(self, mode: ua.MessageSecurityMode, allowed: bool, trust: TrustList | None = None,
                 peer: bytes | None = None) -> None:
        self.read_only = mode == ua.MessageSecurityMode.None_
        self.allowed = allowed  # False: a None channel that exists only for discovery (GetEndpoints)
        self.trust = trust
        self.peer = peer
        self._peer_ok: bool | None = None

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if not self.allowed or action_type_id not in _USER_SERVICES:
            return False  # never the node-management services, whoever asks
        if self.read_only and action_type_id in _MUTATING:
            return False
        if not self.read_only and self.trust is not None:
            if self._peer_ok is None:
                self._peer_ok = self.trust.accepts(self.peer)
            if not self._peer_ok:
                return False
        _REQUEST.set(Request(user if isinstance(user, OpcuaIdentity) else None, self.read_only))
        return True


class _PolicyFactory(SecurityPolicyFactory):
    """asyncua's policy factory, giving every channel its own ruleset that knows the channel's certificate."""

    def __init__(self, base: SecurityPolicyFactory, allowed: bool, trust: TrustList | None) -> None:
        super().__init__(base.cls, base.mode, base.certificate, base.private_key, None, base.certificate_chain)
        self.allowed = allowed
        self.trust = trust

    def create(self, peer_certificate: Any) -> Any:
        if self.mode == ua.MessageSecurityMode.None_:
            peer_certificate = None  # nothing proves that a None channel's client holds the certificate it names
        policy = super().create(peer_certificate)
        policy.permissions = _ChannelRules(self.mode, self.allowed, self.trust,
                                           bytes(peer_certificate) if peer_certificate else None)
        return policy


def current_request() -> Request | None:
    return _REQUEST.get()


def current_session() -> ua.NodeId | None:
    """The SessionId of the client session whose method call is running (None: the server's own)."""
    return _SESSION.get()


class Users(UserManager):
    """Users from the config: password (hashed), X.509 user certificate, or anonymous."""

    def __init__(self, section: OpcuaSection, certificates: dict[bytes, OpcuaUser]) -> None:
        self.anonymous = section.anonymous
        self.by_name = {u.name: u for u in section.user if u.password_hash}
        self.hashes = {u.name: parse_password_hash(u.password_hash) for u in self.by_name.values()}
        self.certificates = certificates
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()  # keyed digests of good (name, password) pairs: repeat logins are cheap
        self.refused = 0
        self.throttled = 0  # of refused: password checks not even run (too many at once)
        self._tokens, self._tokens_at = float(VERIFY_BURST), time.monotonic()
        self._throttle_logged = -math.inf

    def _digest(self, name: str, password: str) -> bytes:
        return hashlib.blake2b(f"{name}\0{password}".encode(), key=self._key).digest()

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        x509_token = _X509_TOKEN.get()
        _X509_TOKEN.set(False)
        if username is not None:
            entry = self.by_name.get(username)
            if entry is None or password is None:
                self.refused += 1
                log.warning("OPC UA login refused: unknown user %r", username)
                return None
            key = self._digest(username, password)
            if key not in self._verified:
                # asyncua's activate_session is synchronous: the hash runs in the event loop (it cannot move to a
                # thread), so a flood of guesses would stall the server; only a few run, the rest are refused unrun
                if not self._take_token():
                    self.refused += 1
                    self.throttled += 1
                    now = time.monotonic()
                    if now - self._throttle_logged >= THROTTLE_LOG_S:
                        self._throttle_logged = now
                        log.warning("OPC UA logins refused: too many password checks (%d so far)", self.throttled)
                    return None
                if not verify_password(password, self.hashes[username]):
                    self.refused += 1
                    log.warning("OPC UA login refused: wrong password for %r", username)
                    return None
                self._verified.add(key)
            return OpcuaIdentity(role=UserRole.User, name=username, bms_role=entry.role, method="password")
        if x509_token:
            entry = self.certificates.get(bytes(certificate)) if certificate is not None else None
            if entry is None:
                self.refused += 1
                log.warning("OPC UA login refused: unknown user certificate")
                return None
            return OpcuaIdentity(role=UserRole.User, name=entry.name, bms_role=entry.role, method="certificate")
        if self.anonymous:
            return OpcuaIdentity(role=UserRole.User, name="anonymous", bms_role="viewer", method="anonymous")
        self.refused += 1
        return None

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(VERIFY_BURST), self._tokens + (now - self._tokens_at) / VERIFY_REFILL_S)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class SecuredInternalServer(InternalServer):
    """asyncua's InternalServer with our sessions (:class:`_Session`), no RegisterServer, and X.509 logins
    marked for :class:`Users`."""

    def __init__(self, users: Users, section: OpcuaSection, trust: TrustList) -> None:
        super().__init__(user_manager=users)
        self.users = users
        self.section = section
        self.trust = trust

    def create_session(self, name: str, user: User = User(role=UserRole.Anonymous),  # noqa: B008 - asyncua's default
                       external: bool = False) -> InternalSession:
        if not external:
            return super().create_session(name, user, external)
        return _Session(self, self.aspace, self.subscription_service, name, user=user, external=True)

    def register_server(self, server: Any, conf: Any = None) -> None:
        # asyncua accepts it from anyone, before any ruleset: fake servers in FindServers, kept for ever
        raise ServiceError(ua.StatusCodes.BadServiceUnsupported)

    def register_server2(self, params: ua.RegisterServer2Parameters) -> None:
        raise ServiceError(ua.StatusCodes.BadServiceUnsupported)

    def verify_x509_token(self, isession: Any, token: ua.X509IdentityToken, signature: ua.SignatureData) -> bytes:
        der = super().verify_x509_token(isession, token, signature)
        _X509_TOKEN.set(True)  # same task as the get_user call that follows: that login is a certificate login
        return der


class _Session(InternalSession):
    """A client's session: activated only on a channel we accept, with capped subscriptions and items."""

    iserver: SecuredInternalServer

    def activate_session(self, params: ua.ActivateSessionParameters,
                         peer_certificate: bytes | None) -> ua.ActivateSessionResult:
        # asyncua runs no ruleset for ActivateSession: without this a discovery-only None channel (or an
        # untrusted one) could log in, i.e. test passwords, before every later request is refused
        srv = self.iserver
        ok = srv.trust.accepts(peer_certificate) if peer_certificate else srv.section.allow_none_readonly
        if not ok:
            srv.users.refused += 1
            log.warning("OPC UA login refused: %s", "the channel's client certificate is not trusted"
                        if peer_certificate else "security None is off")
            raise ServiceError(ua.StatusCodes.BadUserAccessDenied)
        return super().activate_session(params, peer_certificate)

    async def create_subscription(self, params: ua.CreateSubscriptionParameters, callback: Callable[..., Any],
                                  request_callback: Callable[..., Any] | None = None) -> ua.CreateSubscriptionResult:
        subs = self.subscription_service.subscriptions.values()
        if sum(1 for s in subs if s.session_id == self.session_id) >= self.iserver.section.max_subscriptions_per_session:
            raise ServiceError(ua.StatusCodes.BadTooManySubscriptions)
        return await super().create_subscription(params, callback, request_callback)

    async def create_monitored_items(self, params: ua.CreateMonitoredItemsParameters
                                     ) -> list[ua.MonitoredItemCreateResult]:
        subs = self.subscription_service.subscriptions
        sub = subs.get(params.SubscriptionId)
        if sub is None or sub.session_id != self.session_id:
            raise ServiceError(ua.StatusCodes.BadSubscriptionIdInvalid)
        mine = total = 0
        for s in list(subs.values()):
            n = len(s.monitored_item_srv._monitored_items)
            total += n
            mine += n if s.session_id == self.session_id else 0
        sec = self.iserver.section
        room = max(0, min(sec.max_monitored_items_per_session - mine, sec.max_monitored_items - total))
        items = list(params.ItemsToCreate)
        if len(items) <= room:
            return await super().create_monitored_items(params)
        part = copy.copy(params)
        part.ItemsToCreate = items[:room]
        made = await super().create_monitored_items(part) if room else []
        return made + [ua.MonitoredItemCreateResult(StatusCode=status_code(ua.StatusCodes.BadTooManyMonitoredItems))
                       for _ in items[room:]]

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        _SESSION.set(self.session_id)  # for methods that act on the caller's own subscriptions
        return await super().call(params)


class SecuredServer(Server):
    """asyncua's Server with a ruleset per channel and a discovery-only None channel when None is off."""

    def __init__(self, iserver: InternalServer, allow_none: bool, trust: TrustList) -> None:
        super().__init__(iserver=iserver)
        self._allow_none = allow_none
        self._trust = trust

    async def _setup_server_nodes(self) -> None:
        await super()._setup_server_nodes()
        self._policies[:] = [_PolicyFactory(f, True, self._trust) for f in self._policies]
        if not any(f.mode == ua.MessageSecurityMode.None_ for f in self._policies):
            # without this, asyncua falls back to a None policy without any ruleset for a client that asks
            # for None: that channel may do GetEndpoints, and nothing else
            self._policies.append(_PolicyFactory(SecurityPolicyFactory(SecurityPolicyNone, ua.MessageSecurityMode.None_),
                                                 self._allow_none, None))


class TrustList:
    """Client application certificates we accept: the configured ones (or CAs among them), within validity."""

    def __init__(self, trusted: list[x509.Certificate], accept_any: bool) -> None:
        self.der = {c.public_bytes(serialization.Encoding.DER) for c in trusted}
        self.cas = [c for c in trusted if _is_ca(c)]
        self.accept_any = accept_any
        self.rejected = 0

    def check(self, cert: x509.Certificate) -> int:
        """0 when trusted, else the Bad status code."""
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return ua.StatusCodes.BadCertificateTimeInvalid
        if self.accept_any or cert.public_bytes(serialization.Encoding.DER) in self.der:
            return 0
        for ca in self.cas:
            try:
                cert.verify_directly_issued_by(ca)
                return 0
            except Exception:  # any failure means "not issued by this CA"
                continue
        return ua.StatusCodes.BadCertificateUntrusted

    def accepts(self, der: bytes | None) -> bool:
        try:
            ok = der is not None and self.check(x509.load_der_x509_certificate(_first_der(der))) == 0
        except ValueError:
            ok = False
        if not ok:
            self.rejected += 1
            log.warning("OPC UA secure channel refused: its client certificate is not trusted")
        return ok

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        code = self.check(cert)
        if code:
            self.rejected += 1
            log.warning("OPC UA client certificate refused (%s): %s, application %s",
                        ua.StatusCode(cast(Any, code)).name, cert.subject.rfc4514_string(), app.ApplicationUri)
            raise ServiceError(code)


def _is_ca(cert: x509.Certificate) -> bool:
    """A certificate authority, not an application instance certificate (which may also say ca=True)."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    try:
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        return False  # application certificates carry clientAuth/serverAuth
    except x509.ExtensionNotFound:
        return bool(basic.ca and usage.key_cert_sign)


def _first_der(data: bytes) -> bytes:
    """The first certificate of a DER chain (a SEQUENCE: tag, length, content)."""
    if len(data) < 4 or data[0] != 0x30:
        raise ValueError("not a DER certificate")
    n = data[1]
    if n < 0x80:
        return data[: 2 + n]
    size = int.from_bytes(data[2: 2 + (n & 0x7F)], "big")
    return data[: 2 + (n & 0x7F) + size]


def ensure_server_certificate(folder: Path, application_uri: str, hostnames: Sequence[str], days: int,
                              common_name: str = "bmsgw") -> tuple[Path, Path]:
    """The server's key and self-signed certificate in ``folder``, created on first start.

    The key is kept for ever (clients trust the certificate); the certificate is made again
    only when the application URI or a host name is missing from it or it has expired.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file, cert_file = folder / "server_key.pem", folder / "server_cert.der"
    if key_file.is_file():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_file}: not an RSA key")
    else:
        key = cert_gen.generate_private_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_gen.dump_private_key_as_pem(key))
        cert_file.unlink(missing_ok=True)
    names = list(dict.fromkeys(h for h in hostnames if h))
    if cert_file.is_file():
        cert = x509.load_der_x509_certificate(cert_file.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            have = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            uris, have = [], set()
        fresh = cert.not_valid_after_utc > datetime.now(UTC)
        same_key = cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
        if fresh and same_key and application_uri in uris and set(names) <= have:
            return key_file, cert_file
        log.warning("OPC UA server certificate %s is made again (URI, host names or validity changed)", cert_file)
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for h in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {"organizationName": "bmsgw"}, alt,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return key_file, cert_file


def caller_name(req: Request | None) -> str:
    """Who made a request, for logs and refusals: user, role and whether the channel is unsecured."""
    if req is None or req.user is None:
        return "unknown"
    return f"{req.user.name} ({req.user.bms_role}{', security None' if req.read_only else ''})"


__all__ = ["ROLE_RANK", "OpcuaIdentity", "Request", "SecuredInternalServer", "SecuredServer", "TrustList", "Users",
           "caller_name", "current_request", "current_session", "ensure_server_certificate", "load_certificates"]
