"""Network helpers: one probe for every 'is anything listening there?' check; redaction."""

from __future__ import annotations

import socket
import threading
import urllib.parse


def redact(url: str) -> str:
    """The URL without its password (for messages and tags)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def probe_tcp(host: str, port: int, timeout_s: float = 3.0) -> str | None:
    """None if a TCP connection to (host, port) opens within ``timeout_s``, else why not.

    The connection is tried in a daemon thread, so a slow name lookup (which the socket
    timeout does not cover) cannot hold the caller either: it waits ``2 * timeout_s`` at most.
    """
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome["ok"] = "yes"
        except TimeoutError:
            outcome["error"] = f"no answer within {timeout_s:g} s"
        except OSError as err:
            outcome["error"] = err.strerror or type(err).__name__

    thread = threading.Thread(target=probe, name="lia-tcp-probe", daemon=True)
    thread.start()
    thread.join(2 * timeout_s)
    if "ok" in outcome:
        return None
    return outcome.get("error", f"no answer within {2 * timeout_s:g} s")


DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
"""default ports of the database servers a tracking or Optuna URL may name"""


def database_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a database URL's server; None when it names no host (a local socket).

    Raises ValueError for a port that is not a number.
    """
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.split("+", 1)[0].lower()
    host, port = parsed.hostname, parsed.port or DB_PORTS.get(scheme)
    return (host, port) if host and port else None
