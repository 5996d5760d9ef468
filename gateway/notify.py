"""systemd's notify protocol (sd_notify) in a few lines of standard library.

READY once the daemon serves, STATUS lines for `systemctl status`, and WATCHDOG
pings that the daemon sends only while the protection lane is healthy, so a
stalled gateway is killed and restarted by systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # '@' names a socket in the abstract namespace
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else 0.0
        self.sent = 0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """Send KEY=value lines, e.g. send(READY=1, STATUS="running")."""
        if not self.address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(payload, self.address)
        except OSError:
            self.errors += 1
            return False
        self.sent += 1
        return True
