"""A real Mosquitto for tests and benchmarks: free loopback ports, a generated config, a password file made
with ``mosquitto_passwd``, and a TLS listener whose CA and server certificate are made here with
``cryptography``.

Listeners (``per_listener_settings true``, both refuse anonymous clients)::

    127.0.0.1:<port>      plain MQTT, username/password from the password file
    127.0.0.1:<tls_port>  MQTT over TLS (server cert for localhost / 127.0.0.1 signed by the test CA), same
                          password file; client certificates are accepted but not required

Usage::

    with MosquittoBroker(tmp_path) as broker:
        settings = broker.settings()            # plain listener, logged in
        tls = broker.settings(tls=True)         # TLS listener, CA pinned
        broker.restart()                        # same ports, fresh state (no persistence)
"""

from __future__ import annotations

from dataclasses import dataclass
import datetime as dt
import ipaddress
import os
from pathlib import Path
import shutil
import socket
import subprocess
import time
from typing import Any

from fieldpack.device.mqtt.client import BrokerSettings

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def have_mosquitto() -> bool:
    """True when both the broker and ``mosquitto_passwd`` are installed."""
    return Path(MOSQUITTO).is_file() and Path(MOSQUITTO_PASSWD).is_file()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the test CA, the broker's certificate/key, and a client certificate/key, all CA-signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path, *, common_name: str = "fieldpack test CA") -> TlsFiles:
    """Write a CA, a server certificate (SAN ``localhost``, ``127.0.0.1``) and a client certificate into
    ``folder``. EC P-256 keys, valid from an hour ago for two days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(common_name))
        .issuer_name(name(common_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: Any, san: list[x509.GeneralName] | None) -> tuple[Any, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = leaf("fieldpack-test-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    files = TlsFiles(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.server_key)
    write_key(client_key, files.client_key)
    return files


class MosquittoBroker:
    """A Mosquitto process on two free loopback ports (plain + TLS), both requiring a login.

    Args:
        workdir: folder for the config, password file, certificates and log (created).
        username, password: the one account in the password file.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, username: str = "fieldpack", password: str = "s3cret-pass",
                 extra_config: str = "") -> None:
        self.workdir = Path(workdir)
        self.extra_config = extra_config  # global options appended to the config, e.g. "max_packet_size 65536\n"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.username, self.password = username, password
        self.port, self.tls_port = free_port(), free_port()
        self.tls = make_tls_files(self.workdir / "tls")
        self.password_file = self.workdir / "password.txt"  # the password in clear, for --password-file
        self.password_file.write_text(password + "\n", encoding="utf-8")
        self.password_file.chmod(0o600)
        self.passwd_db = self.workdir / "mosquitto.passwd"
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", "-c", str(self.passwd_db), username, password],
            check=True, capture_output=True, timeout=30,
        )
        self.passwd_db.chmod(0o600)
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text(self._config(), encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        user = f"user {os.environ.get('USER') or 'root'}\n" if os.geteuid() == 0 else ""
        auth = f"allow_anonymous false\npassword_file {self.passwd_db}\n"
        return (
            "per_listener_settings true\n"
            "persistence false\n"
            f"{user}"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "set_tcp_nodelay true\n"
            f"{self.extra_config}"
            f"listener {self.port} {self.host}\n{auth}"
            f"listener {self.tls_port} {self.host}\n{auth}"
            f"cafile {self.tls.ca_cert}\ncertfile {self.tls.server_cert}\nkeyfile {self.tls.server_key}\n"
            "require_certificate false\n"
        )

    def start(self, timeout_s: float = 15.0) -> MosquittoBroker:
        """Start the broker and return once both ports accept TCP connections.

        Raises:
            RuntimeError: the process exited or the ports did not open within ``timeout_s``; the message has
                the end of the broker's log.
        """
        if self._proc is not None and self._proc.poll() is None:
            return self
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err}\n{self.log_tail()}")
            if all(self._accepts(p) for p in (self.port, self.tls_port)):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not open ports {self.port}/{self.tls_port}\n{self.log_tail()}")

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same ports; sessions and retained messages are gone."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, *, tls: bool = False) -> str:
        """``mqtt://127.0.0.1:<port>`` or ``mqtts://127.0.0.1:<tls_port>``."""
        return f"mqtts://{self.host}:{self.tls_port}" if tls else f"mqtt://{self.host}:{self.port}"

    def settings(
        self,
        *,
        tls: bool = False,
        client_cert: bool = False,
        password: str | None = None,
        **overrides: Any,
    ) -> BrokerSettings:
        """Broker settings for a client of this broker (logged in; with ``tls`` the test CA pinned and, with
        ``client_cert``, the test client certificate). ``overrides`` replace BrokerSettings fields."""
        fields: dict[str, Any] = dict(
            host=self.host,
            port=self.tls_port if tls else self.port,
            tls=tls,
            username=self.username,
            password=self.password if password is None else password,
            ca_file=self.tls.ca_cert if tls else None,
            cert_file=self.tls.client_cert if tls and client_cert else None,
            key_file=self.tls.client_key if tls and client_cert else None,
            keepalive_s=10,
            reconnect_min_s=0.1,
            reconnect_max_s=1.0,
        )
        fields.update(overrides)
        return BrokerSettings(**fields)

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the broker's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n_bytes:]
        except OSError:
            return "(no broker log)"
