"""The [opcua] config section and the password hashes its users log in with."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_opcua_support import make_cert

from gateway.opcua_config import (
    OpcuaSection,
    OpcuaUser,
    hash_password,
    main,
    parse_password_hash,
    verify_password,
)
from gateway.opcua_nodes import camel, eu_information, unit_id
from gateway.schema import ConfigError, Loader, read_toml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2-sha256"])
def test_hash_round_trip_and_format(scheme: str) -> None:
    encoded = hash_password("correct horse", scheme)  # type: ignore[arg-type]
    assert encoded.startswith(f"${scheme}$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse ", encoded)
    assert hash_password("correct horse", scheme) != encoded  # salted  # type: ignore[arg-type]
    h = parse_password_hash(encoded)
    assert len(h.salt) == 16 and len(h.digest) == 32


@pytest.mark.parametrize("bad,reason", [
    ("secret", "not a password hash"),
    ("$scrypt$ln=14,r=8,p=1$!!!$abc", "not a password hash"),
    ("$scrypt$ln=30,r=8,p=1$c2FsdA$aGFzaA", "out of range"),
    ("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA", "at least 100000"),
    ("$scrypt$ln=14,r=8,p=1$c2FsdA$a", "base64"),
])
def test_bad_hashes_say_why(bad: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_password_hash(bad)


def test_defaults_are_valid_and_secure() -> None:
    s = OpcuaSection()
    s.check()
    assert (s.host, s.port, s.allow_none_readonly, s.anonymous) == ("127.0.0.1", 4840, False, False)
    assert "Basic256Sha256_SignAndEncrypt" in s.security and (s.pack_rate_hz, s.cell_rate_hz) == (10.0, 1.0)
    assert s.endpoint == "opc.tcp://127.0.0.1:4840/bmsgw"
    assert OpcuaSection(host="::1", path="/").endpoint == "opc.tcp://[::1]:4840"


@pytest.mark.parametrize("kwargs,key", [
    (dict(port=0), "port"),
    (dict(path="bmsgw"), "path"),
    (dict(security=[]), "security"),
    (dict(security=["Basic256Sha256_Sign", "Basic256Sha256_Sign"]), "security[1]"),
    (dict(cell_rate_hz=0.0), "cell_rate_hz"),
    (dict(scan_ms=1.0), "scan_ms"),
    (dict(application_uri="not a uri"), "application_uri"),
    (dict(max_subscriptions_per_session=0), "max_subscriptions_per_session"),
    (dict(max_monitored_items=0), "max_monitored_items"),
    (dict(max_monitored_items_per_session=60_000), "max_monitored_items_per_session"),
    (dict(user=[OpcuaUser("a", password_hash=hash_password("x", "pbkdf2-sha256")),
                OpcuaUser("a", certificate="a.der")]), "user[1].name"),
])
def test_check_names_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(key) + ": "):
        OpcuaSection(**kwargs).check()  # type: ignore[arg-type]


def test_loaded_from_toml_with_key_paths_and_lines(tmp_path: Path) -> None:
    good = hash_password("pw", "pbkdf2-sha256")
    text = f'''[opcua]
enabled = true
port = 4841
security = ["Basic256Sha256_SignAndEncrypt"]

[[opcua.user]]
name = "scada"
role = "viewer"
password_hash = "{good}"

[[opcua.user]]
name = "eng"
role = "engineer"
password_hash = "plain-text"
'''
    path = tmp_path / "c.toml"
    path.write_text(text)
    data, raw = read_toml(path)
    with pytest.raises(ConfigError) as err:
        Loader(path, raw).load(OpcuaSection, data["opcua"], "opcua")
    assert err.value.key == "opcua.user[1].password_hash" and err.value.line == 14
    data["opcua"]["user"][1]["password_hash"] = good
    data["opcua"]["user"][1]["role"] = "admin"
    with pytest.raises(ConfigError, match="must be one of 'viewer', 'operator', 'engineer'"):
        Loader(path, raw).load(OpcuaSection, data["opcua"], "opcua")
    data["opcua"]["user"][1]["role"] = "engineer"
    section = Loader(path, raw).load(OpcuaSection, data["opcua"], "opcua")
    assert [u.role for u in section.user] == ["viewer", "engineer"] and section.port == 4841


def test_resolve_finds_certificates_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "laptop.der").write_bytes(make_cert("laptop-user", user=True).cert.read_bytes())
    s = OpcuaSection(user=[OpcuaUser("laptop", "engineer", certificate="certs/laptop.der")],
                     trusted_client_certs=["certs"])
    r = s.resolve(tmp_path)
    assert r.user[0].certificate == str(tmp_path / "certs" / "laptop.der")
    assert r.trusted_client_certs == [str(tmp_path / "certs")]
    with pytest.raises(ValueError, match=r"^trusted_client_certs\[0\]: 'missing.der' not found"):
        OpcuaSection(trusted_client_certs=["missing.der"]).resolve(tmp_path)
    with pytest.raises(ValueError, match=r"^user\[0\].certificate: "):
        OpcuaSection(user=[OpcuaUser("x", certificate="nope.pem")]).resolve(tmp_path)


def test_unreadable_or_shared_certificates_fail_the_config_check(tmp_path: Path) -> None:
    """Found on start-up only, they kept the server failing and retrying; two users with one certificate let
    the last one win silently (a viewer's certificate logged in as engineer)."""
    (tmp_path / "garbage.der").write_bytes(b"this is not a certificate\n")
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "good.der").write_bytes(make_cert("client").cert.read_bytes())
    (tmp_path / "clients" / "old.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n")
    shared = str(make_cert("shared-user", user=True).cert)
    cases = {
        r"^trusted_client_certs\[0\]: '.*garbage.der' is not a certificate \(": dict(trusted_client_certs=["garbage.der"]),
        r"^trusted_client_certs\[0\]: '.*old.pem' is not a certificate \(": dict(trusted_client_certs=["clients"]),
        r"^user\[0\].certificate: '.*garbage.der' is not a certificate \(":
            dict(user=[OpcuaUser("eng", "engineer", certificate="garbage.der")]),
        r"^user\[2\].certificate: same certificate as user\[0\]$":
            dict(user=[OpcuaUser("view", "viewer", certificate=shared), OpcuaUser("other", certificate="clients/good.der"),
                       OpcuaUser("eng", "engineer", certificate=shared)]),
    }
    for reason, kwargs in cases.items():
        with pytest.raises(ValueError, match=reason):
            OpcuaSection(**kwargs).resolve(tmp_path)  # type: ignore[arg-type]
    assert OpcuaSection(trusted_client_certs=["clients/good.der"]).resolve(tmp_path).trusted_client_certs
    # `bmsgw config check` exits 2 naming the file, line and key
    cfg = tmp_path / "bmsgw.toml"
    cfg.write_text((REPO / "gateway/configs/sim.toml").read_text() + f"""
[opcua]
enabled = true

[[opcua.user]]
name = "view"
role = "viewer"
certificate = "{shared}"

[[opcua.user]]
name = "eng"
role = "engineer"
certificate = "{shared}"
""")
    line = len(cfg.read_text().splitlines())  # the second user's certificate
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", str(cfg)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    assert f"{cfg}:{line}: opcua.user[1].certificate: same certificate as user[0]" in r.stderr
    cfg.write_text((REPO / "gateway/configs/sim.toml").read_text() + '\n[opcua]\ntrusted_client_certs = ["clients"]\n')
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", str(cfg)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "opcua.trusted_client_certs[0]: " in r.stderr and "old.pem' is not a certificate" \
        in r.stderr


def test_hash_password_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.opcua_config", "hash-password"], input="s3cret\n",
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    assert verify_password("s3cret", out)
    assert main(["nonsense"]) == 2


def test_units_follow_the_unece_codes() -> None:
    assert unit_id("VLT") == 5655636 and unit_id("CEL") == 4408652 and unit_id("P1") == 20529
    eu = eu_information("A")
    assert (eu.UnitId, eu.DisplayName.Text) == (unit_id("AMP"), "A")
    assert camel("cell_voltage_high") == "CellVoltageHigh" and camel("module.temperature_bad_data") == \
        "ModuleTemperatureBadData"


@pytest.mark.parametrize("names, key", [
    ([""], "cert_hostnames[0]"),
    (["gw.example", "gw example"], "cert_hostnames[1]"),
    (["gw.example\t"], "cert_hostnames[0]"),
], ids=["empty", "space", "tab"])
def test_cert_hostnames_must_be_host_names(names: list[str], key: str) -> None:
    """An empty or spaced name cannot be a subjectAltName of the server certificate."""
    with pytest.raises(ValueError, match="^" + re.escape(key) + ": "):
        OpcuaSection(cert_hostnames=names).check()
    OpcuaSection(cert_hostnames=["gw.example", "192.0.2.7", "fe80::1"]).check()


@pytest.mark.parametrize("name, reason", [
    ("~no-such-user-bmsgw-test/certs", "no such user"),
    ("c" * 300, "too long"),
], ids=["unknown-user", "too-long"])
def test_resolve_turns_an_unusable_name_into_the_keys_error(tmp_path: Path, name: str, reason: str) -> None:
    """These were a RuntimeError / OSError traceback from pathlib (exit code 1)."""
    with pytest.raises(ValueError, match=r"^trusted_client_certs\[0\]: .*" + reason):
        OpcuaSection(trusted_client_certs=[name]).resolve(tmp_path)
    with pytest.raises(ValueError, match=r"^user\[0\]\.certificate: .*" + reason):
        OpcuaSection(user=[OpcuaUser("x", certificate=name)]).resolve(tmp_path)
