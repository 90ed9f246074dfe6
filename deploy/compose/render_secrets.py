#!/usr/bin/env python3
"""Turn the passwords in .env into what the brokers load at boot. Standard library only.

The brokers want password *hashes* in their own formats, while compose hands
over plain passwords from .env. docker-compose.yml runs this script in a
one-shot container before each broker starts:

    render_secrets.py rabbitmq TEMPLATE OUT   definitions with RabbitMQ hashes
    render_secrets.py mosquitto ACL OUT_DIR   Mosquitto password file + ACL copy
    render_secrets.py env [--force]           .env from .env.example, passwords generated

Each template user names the variable holding its password
(``"password_env": "RABBITMQ_EDGE_PASSWORD"``); Mosquitto users are given as
``name=VARIABLE`` arguments. A missing or empty password is an error, so no
broker ever starts with a blank one. Example (on the host, for a look)::

    RABBITMQ_ADMIN_PASSWORD=... python3 render_secrets.py rabbitmq \\
        rabbitmq/definitions.template.json /tmp/definitions.json
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Passwords end up inside amqp:// and mysql:// URLs: keep them URL-safe.
PASSWORD_RE = re.compile(r"^[A-Za-z0-9._~-]{12,}$")
# Mosquitto 2.0's default: PBKDF2-SHA512, 101 rounds, 12-byte salt ("$7$").
MOSQUITTO_ITERATIONS = 101


class RenderError(Exception):
    """A password or template problem; the message says which and how to fix it."""


def password(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise RenderError(f"{name} is not set: put it in deploy/compose/.env (see .env.example)")
    if not PASSWORD_RE.match(value):
        raise RenderError(f"{name} must be at least 12 of A-Z a-z 0-9 . _ ~ - (URL-safe); "
                          "generate one with: openssl rand -hex 24")
    return value


def rabbitmq_hash(plain: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + plain.encode()).digest()).decode()


def mosquitto_hash(plain: str, salt: bytes | None = None) -> str:
    """A mosquitto_passwd line's hash part: $7$<rounds>$<salt>$<pbkdf2-sha512>."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", plain.encode(), salt, MOSQUITTO_ITERATIONS)
    return f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def render_definitions(template: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Replace each user's ``password_env`` with a fresh salted hash of that variable."""
    out = json.loads(json.dumps(template))
    for user in out.get("users", []):
        if "password_env" not in user:
            raise RenderError(f"user {user.get('name')!r} has no password_env in the template")
        user["password_hash"] = rabbitmq_hash(password(env, user.pop("password_env")))
        user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
    return out


def render_mosquitto_passwd(users: Mapping[str, str], env: Mapping[str, str]) -> str:
    """``users`` maps MQTT user name to the variable holding its password."""
    return "".join(f"{name}:{mosquitto_hash(password(env, var))}\n" for name, var in users.items())


def write_private(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    """Write atomically, mode 0600, owned by the broker's uid:gid inside its container."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init_env(example: Path, target: Path, force: bool = False) -> list[str]:
    """Create .env from .env.example with every empty ``*_PASSWORD`` generated; returns their names."""
    if target.exists() and not force:
        raise RenderError(f"{target} exists; keep it, or pass --force to replace every password in it")
    lines, generated = [], []
    for line in example.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and name.endswith("_PASSWORD") and not value:
            line = f"{name}={secrets.token_hex(24)}"
            generated.append(name)
        lines.append(line)
    write_private(target, "\n".join(lines) + "\n", owner=None)
    return generated


def _owner(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid or uid)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rabbit = sub.add_parser("rabbitmq", help="render RabbitMQ definitions")
    rabbit.add_argument("template", type=Path)
    rabbit.add_argument("out", type=Path)
    rabbit.add_argument("--owner", help="uid[:gid] owning the output (RabbitMQ's image: 999)")
    mqtt = sub.add_parser("mosquitto", help="render the Mosquitto password file and copy the ACL")
    mqtt.add_argument("acl", type=Path)
    mqtt.add_argument("out_dir", type=Path)
    mqtt.add_argument("users", nargs="+", metavar="USER=VARIABLE")
    mqtt.add_argument("--owner", help="uid[:gid] owning the output (Mosquitto's image: 1883)")
    dotenv = sub.add_parser("env", help="create .env from .env.example with generated passwords")
    dotenv.add_argument("--force", action="store_true", help="replace an existing .env")
    args = parser.parse_args(argv)
    try:
        if args.command == "rabbitmq":
            definitions = render_definitions(json.loads(args.template.read_text()), env)
            write_private(args.out, json.dumps(definitions, indent=2) + "\n", _owner(args.owner))
            print(f"wrote {args.out}: users {', '.join(u['name'] for u in definitions['users'])}")
        elif args.command == "mosquitto":
            users = dict(u.split("=", 1) for u in args.users)
            write_private(args.out_dir / "passwd", render_mosquitto_passwd(users, env), _owner(args.owner))
            write_private(args.out_dir / "acl", args.acl.read_text(), _owner(args.owner))
            print(f"wrote {args.out_dir}/passwd and acl: users {', '.join(users)}")
        else:
            here = Path(__file__).resolve().parent
            names = init_env(here / ".env.example", here / ".env", force=args.force)
            print(f"wrote {here / '.env'} (mode 0600) with generated {', '.join(names)}")
    except (RenderError, OSError, ValueError) as exc:
        print(f"render_secrets: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
