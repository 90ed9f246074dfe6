#!/usr/bin/env python3
"""Make and render the deployment's secrets: one file per password, no secret in any environment. Stdlib only.

Every password lives in its own file under ``secrets/`` (mode 0600, git-ignored):
``rabbitmq/<user>``, ``rabbitmq/edges/<meter>`` (one RabbitMQ user per Pi),
``mosquitto/<user>``, ``mariadb/emdc``, ``erlang/cookie`` (a RabbitMQ cluster's). The writers get files holding their
whole URLs (``writer/amqp_url`` ...), which compose mounts as Docker secrets
for the ``EMDC_*_FILE`` settings. The brokers want password *hashes*: the
one-shot init containers run this script before each broker starts.

    render_secrets.py init                      create .env and every missing secret file
    render_secrets.py add-edge METER --host H   a RabbitMQ user for one more Pi; prints its URL
    render_secrets.py remove-edge METER         drop a Pi's user
    render_secrets.py rabbitmq TEMPLATE OUT --secrets DIR   definitions with RabbitMQ hashes
    render_secrets.py mosquitto ACL OUT_DIR USER... --secrets DIR   password file + ACL copy
    render_secrets.py erlang-cookie FILE OUT_DIR   the cluster's cookie as RabbitMQ reads it

A password must be URL-safe, strong (about 64 bits by a conservative
estimate) and used by one account only; a missing one is an error, so no
broker ever starts with a blank one. Example (on the host, for a look)::

    python3 render_secrets.py init
    python3 render_secrets.py rabbitmq rabbitmq/definitions.template.json /tmp/d.json --secrets secrets/rabbitmq
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Passwords end up inside amqp:// and mysql:// URLs: keep them URL-safe.
PASSWORD_RE = re.compile(r"^[A-Za-z0-9._~-]+$")
# Symbols * log2(distinct characters) (strength_bits): 0 for "aaaaaaaaaaaa", about 190 for `openssl rand -hex 24`.
MIN_BITS = 64
# Fewer different characters than this is a pattern, whatever its length (48 random hex digits use 11 or more).
MIN_DISTINCT = 8
# A stretch of this many characters seen before in the password adds nothing (a repeated word or period).
MIN_REPEAT = 3
# As common.message.validate_meter_id: a meter id is one routing-key word.
METER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Mosquitto 2.0's default: PBKDF2-SHA512, 101 rounds, 12-byte salt ("$7$").
MOSQUITTO_ITERATIONS = 101
# The backend image's user (deploy/compose/Dockerfile): it must be able to read its secret files.
WRITER_UID = 10001
# Password files ``init`` makes, relative to secrets/.
PASSWORDS = ("rabbitmq/emdc-admin", "rabbitmq/emdc-writer", "rabbitmq/emdc-db-writer",
             "mosquitto/emdc-writer", "mosquitto/homeassistant", "mariadb/emdc", "erlang/cookie")
# The .env variables of earlier releases, moved into files by ``init``. The shared edge user
# emdc-edge is kept only while its file exists (docs/security.md, "Upgrade").
LEGACY_VARIABLES = {"RABBITMQ_ADMIN_PASSWORD": "rabbitmq/emdc-admin", "RABBITMQ_EDGE_PASSWORD": "rabbitmq/emdc-edge",
                    "RABBITMQ_WRITER_PASSWORD": "rabbitmq/emdc-writer",
                    "RABBITMQ_DB_WRITER_PASSWORD": "rabbitmq/emdc-db-writer",
                    "MQTT_WRITER_PASSWORD": "mosquitto/emdc-writer", "MQTT_HA_PASSWORD": "mosquitto/homeassistant",
                    "MARIADB_PASSWORD": "mariadb/emdc"}
SHARED_EDGE = "emdc-edge"
# A writer queue's arguments as a quorum queue (common.topology.queue_arguments, the default delivery limit).
QUORUM_ARGUMENTS = {"x-queue-type": "quorum", "x-delivery-limit": 20, "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish"}
RELOAD = ("docker compose run --rm rabbitmq-init && docker compose exec rabbitmq "
          "rabbitmqctl import_definitions /etc/rabbitmq/definitions/definitions.json")


class RenderError(Exception):
    """A password or template problem; the message says which and how to fix it."""


def _symbols(value: str) -> int:
    """How many choices it takes to write ``value`` when repeats and runs come free.

    A character counts once, except where it continues a run of equal steps
    (``aaaa``, ``1234``, ``fedc``: only the first two count) or starts a
    stretch of 3 or more characters already seen earlier (``abcabc...``,
    ``passwordpassword``: the whole stretch counts as one).
    """
    count, i = 0, 0
    while i < len(value):
        longest = 0
        for start in range(i):
            n = 0
            while i + n < len(value) and value[start + n] == value[i + n]:
                n += 1
            longest = max(longest, n)
        if longest >= MIN_REPEAT:
            count, i = count + 1, i + longest
            continue
        if i >= 2 and ord(value[i]) - ord(value[i - 1]) == ord(value[i - 1]) - ord(value[i - 2]) in (-1, 0, 1):
            i += 1
            continue
        count, i = count + 1, i + 1
    return count


def strength_bits(value: str) -> float:
    """A conservative entropy estimate: the symbols it takes to write ``value`` (runs and repeats come free)
    times log2 of the distinct characters used.

    >>> [round(strength_bits(v)) for v in ("aaaaaaaaaaaa", "ab" * 34, "0123456789abcdef", "passwordpassword1234")]
    [0, 3, 16, 38]
    >>> strength_bits("3f9c0a7e5b21d84c6e0f9a3b7d5c1e82") > 100
    True
    """
    distinct = len(set(value))
    return _symbols(value) * math.log2(distinct) if distinct > 1 else 0.0


def check_password(label: str, value: str) -> str:
    """Return ``value`` if it is usable as ``label``'s password, else raise a one-line :class:`RenderError`."""
    fix = "delete it and run render_secrets.py init for a generated one (or use: openssl rand -hex 24)"
    if not value:
        raise RenderError(f"{label} is empty: {fix}")
    if not PASSWORD_RE.match(value):
        raise RenderError(f"{label} may only hold A-Z a-z 0-9 . _ ~ - (it goes into URLs): {fix}")
    bits, distinct = strength_bits(value), len(set(value))
    if bits < MIN_BITS or distinct < MIN_DISTINCT:
        few = f"; {distinct} different characters, {MIN_DISTINCT} needed" if distinct < MIN_DISTINCT else ""
        raise RenderError(f"{label} is too weak (about {bits:.0f} bits, {MIN_BITS} needed{few}): {fix}")
    return value


def check_distinct(passwords: Mapping[str, str]) -> None:
    """Refuse one password for two accounts: a leak of one must not open the other."""
    seen: dict[str, str] = {}
    for label, value in passwords.items():
        if value in seen:
            raise RenderError(f"{seen[value]} and {label} hold the same password: give each account its own "
                              f"(delete {label} and run render_secrets.py init)")
        seen[value] = label


def read_password(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise RenderError(f"{path} is missing: run python3 render_secrets.py init") from None
    return check_password(str(path), value)


def read_passwords(paths: Iterable[Path]) -> dict[str, str]:
    """``{path: password}``, each checked, all distinct."""
    passwords = {str(path): read_password(path) for path in paths}
    check_distinct(passwords)
    return passwords


def rabbitmq_hash(plain: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + plain.encode()).digest()).decode()


def mosquitto_hash(plain: str, salt: bytes | None = None) -> str:
    """A mosquitto_passwd line's hash part: $7$<rounds>$<salt>$<pbkdf2-sha512>."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", plain.encode(), salt, MOSQUITTO_ITERATIONS)
    return f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_meter(meter: str) -> str:
    if not METER_RE.match(meter):
        raise RenderError(f"meter id {meter!r:.80} must be 1-64 characters of A-Z a-z 0-9 _ - (as meter_id on the Pi)")
    return meter


def edge_meters(secrets_dir: Path) -> list[str]:
    """The meters with a Pi account: one password file each in ``<secrets_dir>/edges/``."""
    edges = secrets_dir / "edges"
    return sorted(check_meter(p.name) for p in edges.iterdir() if not p.name.startswith(".")) if edges.is_dir() else []


def _account(shape: Mapping[str, Any], name: str, meter: str = "") -> dict[str, list[dict[str, Any]]]:
    """The permissions and topic permissions of one edge user, from the template's shape."""
    def fill(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"user": name, "vhost": shape["vhost"],
                **{k: v.replace("{meter}", meter) if isinstance(v, str) else v for k, v in entry.items()}}
    return {"permissions": [fill(shape["permissions"])],
            "topic_permissions": [fill(entry) for entry in shape["topic_permissions"]]}


def render_definitions(template: Mapping[str, Any], secrets_dir: Path, queue_type: str = "classic") -> dict[str, Any]:
    """The template with a salted hash for every user, plus one user per Pi (``edges/<meter>``).

    ``queue_type="quorum"`` makes the writer queues and their dead-letter
    queues quorum queues, with the arguments the writers declare
    (``common.topology.queue_arguments``; a test keeps the two in step).

    The password of template user ``u`` is the file ``<secrets_dir>/u``. The
    template's ``edge_accounts`` give the rights of a Pi's user
    (``{meter}`` filled in) and of the shared user of earlier releases, which
    is rendered only while its password file still exists.
    """
    out: dict[str, Any] = json.loads(json.dumps(template))
    if queue_type == "quorum":
        for queue in out["queues"]:
            if queue["arguments"].get("x-single-active-consumer"):
                queue["arguments"] |= QUORUM_ARGUMENTS
                # A quorum queue takes its overflow from a policy over its arguments; dead-lettering at least
                # once needs reject-publish (a full queue refuses pulses, which the edges keep).
                for policy in out["policies"]:
                    if re.search(policy["pattern"], queue["name"]):
                        policy["definition"]["overflow"] = "reject-publish"
            elif queue["name"].endswith(".dead"):
                queue["arguments"] |= {"x-queue-type": "quorum"}
    accounts = out.pop("edge_accounts")
    names = [u["name"] for u in out["users"]]
    edges = {f"{accounts['per_meter']['user'].replace('{meter}', m)}": m for m in edge_meters(secrets_dir)}
    files = {name: secrets_dir / name for name in names}
    files |= {name: secrets_dir / "edges" / meter for name, meter in edges.items()}
    if (secrets_dir / SHARED_EDGE).exists():
        files[SHARED_EDGE] = secrets_dir / SHARED_EDGE
    passwords = read_passwords(files.values())
    for name, meter in edges.items():
        out["users"].append({"name": name, "tags": []})
        for section, entries in _account(accounts["per_meter"], name, meter).items():
            out[section] += entries
    if SHARED_EDGE in files:
        out["users"].append({"name": SHARED_EDGE, "tags": []})
        for section, entries in _account(accounts["shared"], SHARED_EDGE).items():
            out[section] += entries
    for user in out["users"]:
        user["password_hash"] = rabbitmq_hash(passwords[str(files[user["name"]])])
        user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
    return out


def render_mosquitto_passwd(users: Iterable[str], secrets_dir: Path) -> str:
    """A Mosquitto password file; the password of ``user`` is the file ``<secrets_dir>/user``."""
    users = list(users)
    passwords = read_passwords(secrets_dir / user for user in users)
    return "".join(f"{user}:{mosquitto_hash(passwords[str(secrets_dir / user)])}\n" for user in users)


def write_private(path: Path, text: str, owner: tuple[int, int] | None, mode: int = 0o600) -> None:
    """Write atomically with ``mode``, owned by ``owner`` (a container's uid:gid) if given."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_env(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a compose .env file (no quoting, as .env.example writes them)."""
    if not path.exists():
        return {}
    pairs = (line.partition("=") for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def client_files(secrets_dir: Path, rabbitmq_host: str) -> dict[str, str]:
    """What the writers read with ``EMDC_AMQP_URL_FILE`` and friends, relative to secrets/."""
    def password(name: str) -> str:
        return read_password(secrets_dir / name)

    def amqp(user: str, scheme: str, port: int) -> str:
        return f"{scheme}://{user}:{password(f'rabbitmq/{user}')}@{rabbitmq_host}:{port}/%2F"

    return {"writer/amqp_url": amqp("emdc-writer", "amqp", 5672),
            "writer/amqps_url": amqp("emdc-writer", "amqps", 5671),
            "writer/mqtt_password": password("mosquitto/emdc-writer"),
            "db-writer/amqp_url": amqp("emdc-db-writer", "amqp", 5672),
            "db-writer/amqps_url": amqp("emdc-db-writer", "amqps", 5671),
            "db-writer/db_url": f"mysql+pymysql://emdc:{password('mariadb/emdc')}@mariadb/emdc",
            # The state an active/standby pair of MQTT writers shares (docker-compose.standby.yml).
            "writer/state_url": f"mysql+pymysql://emdc:{password('mariadb/emdc')}@mariadb/emdc"}


def all_password_files(secrets_dir: Path) -> list[Path]:
    found = [secrets_dir / name for name in (*PASSWORDS, f"rabbitmq/{SHARED_EDGE}")]
    return [p for p in found if p.exists()] + [secrets_dir / "rabbitmq/edges" / m
                                               for m in edge_meters(secrets_dir / "rabbitmq")]


def init(compose_dir: Path) -> list[str]:
    """Create .env and every missing secret; move the passwords of an old .env into files. Returns what it did.

    Existing password files are kept (delete one to replace it); the writers'
    URL files are rewritten every time, from the passwords and ``RABBITMQ_HOST``.
    """
    env_file, secrets_dir = compose_dir / ".env", compose_dir / "secrets"
    done = []
    if not env_file.exists():
        write_private(env_file, (compose_dir / ".env.example").read_text(), owner=None)
        done.append(f"wrote {env_file} from .env.example")
    env = read_env(env_file)
    moved = {var: name for var, name in LEGACY_VARIABLES.items() if env.get(var)}
    for var, name in moved.items():
        if not (secrets_dir / name).exists():
            write_private(secrets_dir / name, env[var] + "\n", owner=None)
    if moved:
        kept = [line for line in env_file.read_text().splitlines() if line.partition("=")[0].strip() not in moved]
        write_private(env_file, "\n".join(kept) + "\n", owner=None)
        done.append(f"moved {', '.join(moved)} from .env into secrets/")
    made = [name for name in PASSWORDS if not (secrets_dir / name).exists()]
    for name in made:
        write_private(secrets_dir / name, secrets.token_hex(24) + "\n", owner=None)
    if made:
        done.append(f"generated secrets/{', secrets/'.join(made)}")
    check_distinct({str(p): read_password(p) for p in all_password_files(secrets_dir)})
    # Read inside the writer containers by their non-root user.
    owner, mode = ((WRITER_UID, WRITER_UID), 0o400) if os.geteuid() == 0 else (None, 0o444)
    for name, text in client_files(secrets_dir, env.get("RABBITMQ_HOST") or "rabbitmq").items():
        write_private(secrets_dir / name, text + "\n", owner, mode)
    os.chmod(secrets_dir, 0o700)
    done.append("wrote the writers' files in secrets/writer/ and secrets/db-writer/")
    return done


def add_edge(secrets_dir: Path, meter: str, host: str, tls: bool) -> str:
    """Make the password of meter's Pi user; return the RabbitMQ URL that Pi needs (its secret only)."""
    path = secrets_dir / "rabbitmq" / "edges" / check_meter(meter)
    if path.exists():
        raise RenderError(f"{path} exists: that meter has a Pi account already (remove-edge {meter} to replace it)")
    write_private(path, secrets.token_hex(24) + "\n", owner=None)
    check_distinct({str(p): read_password(p) for p in all_password_files(secrets_dir)})
    scheme, port = ("amqps", 5671) if tls else ("amqp", 5672)
    return f"{scheme}://emdc-edge-{meter}:{read_password(path)}@{host}:{port}/%2F"


def _owner(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid or uid)


def main(argv: list[str] | None = None, compose_dir: Path = HERE) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create .env and every missing secret file (keeps existing ones)")
    add = sub.add_parser("add-edge", help="a RabbitMQ user for the Pi of METER; prints its URL")
    add.add_argument("meter")
    add.add_argument("--host", default=socket.getfqdn(), help="RabbitMQ's name as the Pi reaches it")
    add.add_argument("--tls", action="store_true", help="print an amqps:// URL (port 5671)")
    remove = sub.add_parser("remove-edge", help="delete the Pi user of METER")
    remove.add_argument("meter")
    rabbit = sub.add_parser("rabbitmq", help="render RabbitMQ definitions")
    rabbit.add_argument("template", type=Path)
    rabbit.add_argument("out", type=Path)
    rabbit.add_argument("--secrets", type=Path, required=True, help="directory of the RabbitMQ password files")
    rabbit.add_argument("--owner", help="uid[:gid] owning the output (RabbitMQ's image: 999)")
    rabbit.add_argument("--queue-type", choices=("classic", "quorum"), default="classic",
                        help="writer queues: classic, or quorum (replicated over a cluster)")
    mqtt = sub.add_parser("mosquitto", help="render the Mosquitto password file and copy the ACL")
    mqtt.add_argument("acl", type=Path)
    mqtt.add_argument("out_dir", type=Path)
    mqtt.add_argument("users", nargs="+", metavar="USER")
    mqtt.add_argument("--secrets", type=Path, required=True, help="directory of the Mosquitto password files")
    mqtt.add_argument("--owner", help="uid[:gid] owning the output (Mosquitto's image: 1883)")
    cookie = sub.add_parser("erlang-cookie", help="install the cluster's Erlang cookie for the RabbitMQ nodes")
    cookie.add_argument("source", type=Path)
    cookie.add_argument("out_dir", type=Path)
    cookie.add_argument("--owner", help="uid[:gid] owning the output (RabbitMQ's image: 999)")
    args = parser.parse_args(argv)
    secrets_dir = compose_dir / "secrets"
    try:
        if args.command == "init":
            print("\n".join(init(compose_dir)))
        elif args.command == "add-edge":
            url = add_edge(secrets_dir, args.meter, args.host, args.tls)
            print(f"added RabbitMQ user emdc-edge-{args.meter}; load it on the RabbitMQ host with:\n  {RELOAD}\n"
                  f"then on the Pi: meter_id = \"{args.meter}\" in /etc/emdc/emdc.toml, and this line in "
                  f"/etc/emdc/amqp_url (root:emdc, mode 0640):\n{url}")
        elif args.command == "remove-edge":
            path = secrets_dir / "rabbitmq" / "edges" / check_meter(args.meter)
            path.unlink()
            print(f"removed {path}; on the RabbitMQ host: docker compose run --rm rabbitmq-init && "
                  f"docker compose exec rabbitmq rabbitmqctl delete_user emdc-edge-{args.meter}")
        elif args.command == "rabbitmq":
            definitions = render_definitions(json.loads(args.template.read_text()), args.secrets, args.queue_type)
            write_private(args.out, json.dumps(definitions, indent=2) + "\n", _owner(args.owner))
            print(f"wrote {args.out}: users {', '.join(u['name'] for u in definitions['users'])}")
            if any(u["name"] == SHARED_EDGE for u in definitions["users"]):
                print(f"the shared user {SHARED_EDGE} may publish any meter's pulses: give each Pi its own "
                      "(add-edge) and remove it (docs/security.md, Upgrade)")
        elif args.command == "erlang-cookie":
            # Erlang refuses a cookie file that anyone but its owner may read.
            write_private(args.out_dir / ".erlang.cookie", read_password(args.source), _owner(args.owner), 0o400)
            print(f"wrote {args.out_dir}/.erlang.cookie")
        else:
            write_private(args.out_dir / "passwd", render_mosquitto_passwd(args.users, args.secrets),
                          _owner(args.owner))
            write_private(args.out_dir / "acl", args.acl.read_text(), _owner(args.owner))
            print(f"wrote {args.out_dir}/passwd and acl: users {', '.join(args.users)}")
    except (RenderError, OSError, ValueError) as exc:
        print(f"render_secrets: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
