"""OPC UA security: endpoints and policies, certificates, users and what is refused without them."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from cryptography import x509
from test_opcua_support import Harness, Site, connect, free_port, make_cert, node, ns_of, run, section, wait_for

pytestmark = pytest.mark.slow

SECURE = {("Basic256Sha256", "SignAndEncrypt"), ("Basic256Sha256", "Sign"),
          ("Aes128Sha256RsaOaep", "SignAndEncrypt"), ("Aes128Sha256RsaOaep", "Sign")}


def policy_name(uri: str) -> str:
    return uri.rsplit("#", 1)[-1].replace("_", "")


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Default security: no None endpoint, no anonymous logins."""
    state = tmp_path_factory.mktemp("opcua-strict")
    with Harness(section(), Site(), state) as harness:
        harness.state = state  # type: ignore[attr-defined]
        yield harness


async def endpoints(url: str) -> list[ua.EndpointDescription]:
    client = Client(url, timeout=30)
    return list(await client.connect_and_get_server_endpoints())


def test_endpoints_offer_sign_and_encrypt_and_sign_only(strict: Harness) -> None:
    found = run(lambda: endpoints(strict.url))
    offered = {(policy_name(e.SecurityPolicyUri), e.SecurityMode.name) for e in found}
    assert offered == SECURE  # no None
    tokens = {t.TokenType for e in found for t in e.UserIdentityTokens}
    assert tokens == {ua.UserTokenType.UserName, ua.UserTokenType.Certificate}  # no anonymous
    assert all(e.Server.ApplicationUri == "urn:bmsgw:test-gw" for e in found)


@pytest.mark.parametrize("policy,mode", sorted(SECURE))
def test_every_secure_policy_connects(strict: Harness, policy: str, mode: str) -> None:
    async def body() -> None:
        async with connect(strict.url, "vera", policy=policy, mode=getattr(ua.MessageSecurityMode, mode)) as c:
            ns = await ns_of(c)
            assert await node(c, ns, "Identification.Site").read_value() == "test-site"
    run(body)


def test_security_none_is_refused_unless_configured(strict: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        with pytest.raises(ua.UaError, match="No matching endpoints"):  # a well-behaved client does not try
            async with connect(strict.url, "erin", policy=None):
                pass
        # a client that ignores the endpoint list gets a channel for discovery and nothing else
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: list(eps)[0]))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with connect(strict.url, "erin", policy=None) as c:
                await c.get_namespace_array()
    run(body)


def test_anonymous_is_off_unless_configured(strict: Harness) -> None:
    async def body() -> None:
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            async with connect(strict.url, None):
                pass
    run(body)


@pytest.mark.parametrize("user,password", [("erin", "wrong"), ("mallory", "engineer-pw")])
def test_bad_passwords_and_unknown_users_are_refused(strict: Harness, user: str, password: str) -> None:
    async def body() -> None:
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with connect(strict.url, user, password=password):
                pass
    run(body)


def test_untrusted_client_certificates_are_refused(strict: Harness) -> None:
    async def body() -> None:
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            async with connect(strict.url, "vera", cert=make_cert("stranger")):
                pass
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):  # a user certificate nobody configured
            async with connect(strict.url, user_cert=make_cert("stranger-user", user=True)):
                pass
    run(body)
    assert strict.server.status()["certificates_refused"] >= 1


def test_server_certificate_is_created_once_in_the_state_dir(strict: Harness) -> None:
    state: Path = strict.state  # type: ignore[attr-defined]
    cert_file, key_file = state / "opcua" / "server_cert.der", state / "opcua" / "server_key.pem"
    first = cert_file.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate(first)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:bmsgw:test-gw" in san.get_values_for_type(x509.UniformResourceIdentifier)
    found = run(lambda: endpoints(strict.url))
    assert all(e.ServerCertificate == first for e in found)
    with Harness(section(), Site(), state) as again:  # a restart keeps key and certificate (clients trust it)
        assert cert_file.read_bytes() == first
        assert all(e.ServerCertificate == first for e in run(lambda: endpoints(again.url)))


def test_an_untrusted_channel_cannot_hide_its_certificate_from_create_session(strict: Harness) -> None:
    """The trust list applies to the certificate that secures the channel, declared in CreateSession or not."""
    async def body() -> None:
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with connect(strict.url, "erin", cert=make_cert("stranger"), strip_client_certificate=True) as c:
                await c.get_namespace_array()
    run(body)


def test_a_failed_start_is_retried_and_never_raised(tmp_path: Path) -> None:
    """The port is taken: the server logs, exposes the error and tries again; the daemon keeps running."""
    import socket

    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    h = Harness(section(port=port), Site(), tmp_path)
    h.start()
    try:
        async def failed() -> None:
            await wait_for(lambda: h.server.stats.last_error != "")
        run(failed)
        assert "address already in use" in h.server.stats.last_error.lower() or "98" in h.server.stats.last_error
        assert not h.server.status()["listening"]
        blocker.close()
        h.wait_ready()

        async def body() -> None:
            async with connect(h.url, "vera") as c:
                assert await node(c, await ns_of(c), "Identification.Site").read_value() == "test-site"
        run(body)
        assert h.server.stats.starts >= 2 and h.server.stats.last_error == ""
    finally:
        blocker.close()
        h.__exit__(None, None, None)


def test_a_discovery_only_none_channel_cannot_even_log_in(strict: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """ActivateSession on it is refused before the password is looked at (it used to activate, answering
    differently for a right and a wrong password, and to run the hash for anyone without a certificate)."""
    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: list(eps)[0]))
    refused = strict.server.status()["logins_refused"]

    async def body() -> None:
        for password in ("engineer-pw", "wrong"):
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                async with connect(strict.url, "erin", password=password, policy=None):
                    pass  # the session must not even activate
    run(body)
    assert strict.server.status()["logins_refused"] - refused == 2


def test_a_burst_of_password_guesses_is_throttled(tmp_path: Path) -> None:
    """Only a few password checks run at once (each is a hash in the event loop); the rest are refused unrun.
    A password already verified needs no check and still logs in."""
    with Harness(section(), Site(), tmp_path) as h:
        async def login(password: str) -> str:
            try:
                async with connect(h.url, "vera", password=password) as c:
                    await c.get_namespace_array()
                    return "ok"
            except ua.uaerrors.BadUserAccessDenied:
                return "refused"

        async def body() -> None:
            assert await login("viewer-pw") == "ok"
            results = await asyncio.gather(*[login(f"guess-{k}") for k in range(12)])
            assert results == ["refused"] * 12
            assert await login("viewer-pw") == "ok"  # remembered: no check, no token
        run(body)
        st = h.server.status()
        assert st["logins_refused"] == 12 and st["logins_throttled"] >= 1


def test_register_server_is_refused_and_the_server_carries_on(strict: Harness) -> None:
    """RegisterServer(2) came without a session or certificate and planted servers in FindServers for ever."""
    async def body() -> None:
        c = Client(strict.url, timeout=30)
        await c.connect_socket()
        try:
            await c.send_hello()
            await c.open_secure_channel()
            s = ua.RegisteredServer()
            s.ServerUri, s.ProductUri, s.IsOnline = "urn:evil:1", "urn:evil", True
            s.ServerNames = [ua.LocalizedText("use this one")]
            s.DiscoveryUrls = ["opc.tcp://203.0.113.66:4840/bmsgw"]
            s.ServerType = ua.ApplicationType.Server
            with pytest.raises(ua.uaerrors.BadServiceUnsupported):
                await c.uaclient.register_server(s)
            params = ua.RegisterServer2Parameters()
            params.Server = s
            with pytest.raises(ua.uaerrors.BadServiceUnsupported):
                await c.uaclient.register_server2(params)
            await c.close_secure_channel()
        finally:
            c.disconnect_socket()
        servers = await Client(strict.url, timeout=30).connect_and_find_servers()
        assert [s.ApplicationUri for s in servers] == ["urn:bmsgw:test-gw"]
        async with connect(strict.url, "vera") as v:
            assert await node(v, await ns_of(v), "Identification.Site").read_value() == "test-site"
    run(body)


def test_subscriptions_and_monitored_items_are_capped(tmp_path: Path) -> None:
    """Per session and in total; what does not fit is refused item by item; another session's subscription
    takes no items."""
    sec = section(max_subscriptions_per_session=2, max_monitored_items_per_session=5, max_monitored_items=8)
    with Harness(sec, Site(), tmp_path) as h:
        async def body() -> None:
            async with connect(h.url, "vera") as a, connect(h.url, "otto", cert=make_cert("client2")) as b:
                ns = await ns_of(a)
                volts = [node(a, ns, f"Strings.String0.Modules.Module0.Cells.Cell{k}.Voltage") for k in range(7)]
                sub1 = await a.create_subscription(100, None)
                await a.create_subscription(100, None)
                with pytest.raises(ua.uaerrors.BadTooManySubscriptions):
                    await a.create_subscription(100, None)
                res = await sub1.subscribe_data_change(volts, queuesize=1)
                assert [isinstance(r, int) for r in res] == [True] * 5 + [False] * 2
                assert all(r.value == ua.StatusCodes.BadTooManyMonitoredItems for r in res[5:])
                subb = await b.create_subscription(100, None)
                res = await subb.subscribe_data_change([b.get_node(v.nodeid) for v in volts[:5]], queuesize=1)
                assert sum(isinstance(r, int) for r in res) == 3  # 8 in total
                # b adds items to a's subscription by its id
                params = ua.CreateMonitoredItemsParameters()
                params.SubscriptionId = sub1.subscription_id
                item = ua.MonitoredItemCreateRequest()
                item.ItemToMonitor.NodeId = volts[0].nodeid
                item.ItemToMonitor.AttributeId = ua.AttributeIds.Value
                item.RequestedParameters.ClientHandle = 1
                params.ItemsToCreate = [item]
                with pytest.raises(ua.uaerrors.BadSubscriptionIdInvalid):
                    await b.uaclient.create_monitored_items(params)
            assert h.server.status()["monitored_items"] == 0  # closed sessions take theirs along
        run(body)
