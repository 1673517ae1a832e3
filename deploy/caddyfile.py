#!/usr/bin/env python3
"""Render deploy/Caddyfile.in into a Caddyfile for one host (standard library only).

    python3 deploy/caddyfile.py --site volunteer.example.org --email ops@example.org \\
        --out /etc/caddy/Caddyfile

A public name gets its certificate automatically (ACME: ports 80 and 443 reachable from the
internet, the name's DNS pointing here). --tls-internal uses Caddy's own local CA instead (a test,
a LAN). One --upstream per coordinator process (default: 127.0.0.1:8080); in the rendered file each
is one `to` line, so adding a process later is one line there too. See deploy/README.md.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("Caddyfile.in")
DEFAULT_UPSTREAM = "127.0.0.1:8080"
# At least the coordinator's result cap for the job's model (4 bytes a parameter + --body-slack-bytes,
# 1 MiB by default): alexnet, the largest registered model (5.3M), needs 22 MB; a 10M-parameter model 41 MB.
DEFAULT_MAX_BODY = "64MiB"
MARKER = re.compile(r"^([ \t]*)@@([A-Z_]+)@@[ \t]*$|@@([A-Z_]+)@@", re.MULTILINE)
SITE_RE = re.compile(r"(https://)?[A-Za-z0-9.\-\[\]:]+")
UPSTREAM_RE = re.compile(r"(https?://)?[A-Za-z0-9.\-\[\]]+:[0-9]{1,5}")
SIZE_RE = re.compile(r"[0-9]+([KMG]i?B)?")


def render(site: str, upstreams: list[str] | None = None, *, email: str | None = None, tls_internal: bool = False,
           max_body: str = DEFAULT_MAX_BODY, http_port: int | None = None, https_port: int | None = None,
           admin: str | None = None, template: str | None = None, health_uri: str | None = None) -> str:
    """The Caddyfile text. ``site``: a public name (``volunteer.example.org``) or an address
    (``https://127.0.0.1:8443``); ``upstreams``: ``host:port`` of each coordinator process; ``health_uri``:
    a path each upstream answers itself (active health checks every second)."""
    upstreams = upstreams or [DEFAULT_UPSTREAM]
    if not SITE_RE.fullmatch(site):
        raise ValueError(f"site: expected a host name or https://host[:port], got {site!r}")
    for u in upstreams:
        if not UPSTREAM_RE.fullmatch(u):
            raise ValueError(f"upstream: expected host:port, got {u!r}")
    if not SIZE_RE.fullmatch(max_body):
        raise ValueError(f"max body: expected a size like 64MiB, got {max_body!r}")
    if email is not None and not re.fullmatch(r"[^\s{}@]+@[^\s{}@]+", email):
        raise ValueError(f"email: expected an address, got {email!r}")
    if health_uri is not None and not re.fullmatch(r"/[A-Za-z0-9/_.\-]*", health_uri):
        raise ValueError(f"health uri: expected a path like /api/v1/cluster, got {health_uri!r}")
    if admin is not None and not re.fullmatch(r"off|[A-Za-z0-9.\-\[\]]*:[0-9]{1,5}", admin):
        raise ValueError(f"admin: expected off or host:port, got {admin!r}")
    global_lines = []
    if email:
        global_lines.append(f"email {email}")
    if admin:
        global_lines.append(f"admin {admin}")
    if http_port is not None:
        global_lines.append(f"http_port {int(http_port)}")
    if https_port is not None:
        global_lines.append(f"https_port {int(https_port)}")
    if tls_internal:
        global_lines.append("skip_install_trust")   # never touch the system's trust store
    values = {
        "GLOBAL": global_lines,
        "SITE": [site],
        "TLS": ["tls internal"] if tls_internal else [],
        "MAX_BODY": [max_body],
        "UPSTREAMS": [f"to {u}" for u in upstreams],
        "HEALTH": [f"health_uri {health_uri}", "health_interval 1s", "health_timeout 5s"] if health_uri else [],
    }
    text = template if template is not None else TEMPLATE.read_text()

    def fill(m: re.Match) -> str:
        indent, name = (m.group(1), m.group(2)) if m.group(2) else (None, m.group(3))
        if name not in values:
            raise ValueError(f"template: unknown marker @@{name}@@")
        lines = values[name]
        if indent is None:          # inline: exactly one value
            if len(lines) != 1:
                raise ValueError(f"template: @@{name}@@ is inline but has {len(lines)} values")
            return lines[0]
        return "\n".join(indent + line for line in lines) if lines else "\x00"   # \x00: drop the line

    out = MARKER.sub(fill, text)
    return re.sub(r"^\x00\n", "", out, flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/caddyfile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--site", required=True, help="the public name (volunteer.example.org), or https://HOST:PORT")
    p.add_argument("--upstream", action="append", metavar="HOST:PORT",
                   help=f"a coordinator process; repeat for several (default: {DEFAULT_UPSTREAM})")
    p.add_argument("--email", help="the ACME account's e-mail (certificate expiry notices)")
    p.add_argument("--tls-internal", action="store_true", help="certificates from Caddy's local CA, not ACME")
    p.add_argument("--max-body", default=DEFAULT_MAX_BODY,
                   help=f"largest request body; at least the coordinator's result cap (default: {DEFAULT_MAX_BODY})")
    p.add_argument("--http-port", type=int, help="Caddy's HTTP port (default 80: ACME and redirects to HTTPS)")
    p.add_argument("--https-port", type=int, help="Caddy's HTTPS port (default 443)")
    p.add_argument("--admin", help="Caddy's admin endpoint, host:port or off (default: localhost:2019, which "
                                   "`systemctl reload caddy` uses)")
    p.add_argument("--health-uri", metavar="PATH",
                   help="a path every upstream answers itself, checked every second: /api/v1/cluster with "
                        "several `crowdtrain coordinator --redis` processes, so that Caddy stops sending to a dead "
                        "one at once (default: none: an upstream is avoided for 10 s after a failed connection)")
    p.add_argument("--out", type=Path, help="write here (default: standard output)")
    a = p.parse_args(argv)
    try:
        text = render(a.site, a.upstream, email=a.email, tls_internal=a.tls_internal, max_body=a.max_body,
                      http_port=a.http_port, https_port=a.https_port, admin=a.admin, health_uri=a.health_uri)
    except ValueError as e:
        p.error(str(e))
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
