"""The deployment artifacts in deploy/, checked as far as this machine allows.

No Docker engine runs here, so each piece is exercised on its own:

* the systemd unit: directives, ``systemd-analyze verify`` and ``security``;
* install-edge.sh: a full install/upgrade/uninstall in a scratch root, with
  stand-ins for useradd, systemctl and friends;
* the example TOML: documents every setting, with true defaults, and loads;
* docker-compose files: parsed, every file/volume/variable reference checked,
  and validated by a compose implementation when one is installed;
* the Dockerfile: its install step replayed in a fresh venv;
* render_secrets.py: the secret files it makes, the passwords it refuses;
* RabbitMQ definitions: compared with common.topology (a private broker loaded
  with them probes every account in tests/test_accounts.py);
* Mosquitto: the real config started on a free port, probed with paho-mqtt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from common import topology
from common.config import Config, load_config, settings_table
from tests.support import free_port

REPO = Path(__file__).resolve().parent.parent
EDGE = REPO / "deploy" / "edge"
COMPOSE = REPO / "deploy" / "compose"
UNIT = EDGE / "emdc-edge.service"
EXAMPLE_TOML = EDGE / "emdc.example.toml"
DEFINITIONS = COMPOSE / "rabbitmq" / "definitions.template.json"
MOSQUITTO_CONF = COMPOSE / "mosquitto" / "config" / "mosquitto.conf"
SECRET_SETTINGS = {f.name for f in dataclasses.fields(Config) if f.metadata.get("secret")}


def _load_script(path: Path) -> Any:
    """Import a stand-alone script (deploy/compose is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_secrets = _load_script(COMPOSE / "render_secrets.py")


def need(tool: str) -> str:
    """Path of a tool the checks can't do without; fail (not skip) if it is missing."""
    path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)),
                                      None)
    if path is None:
        pytest.fail(f"{tool} is not installed; the deploy checks need it")
    return path


def random_password() -> str:
    return uuid.uuid4().hex


# ====================================================================== systemd unit


def unit_directives() -> dict[str, list[str]]:
    """``Key`` -> values in order (keys may repeat), across sections."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_required_directives():
    d = unit_directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == "78"  # a configuration error: `emdc edge run` says it in one line
    assert re.fullmatch(r"\d+s?", one["WatchdogSec"])
    assert one["User"] == "emdc"  # dedicated, not root
    assert "gpio" in one["SupplementaryGroups"].split()
    assert one["StateDirectory"] == "emdc"
    env = dict(e.split("=", 1) for e in d["Environment"])
    assert env["GPIOZERO_PIN_FACTORY"] == "lgpio"
    assert env["EMDC_STATE_DIR"] == "/var/lib/emdc"
    assert env["EMDC_CONFIG"] == "/etc/emdc/emdc.toml"
    # lgpio needs a writable working directory: the unit's own runtime or state directory.
    assert one["WorkingDirectory"] in {f"/run/{one.get('RuntimeDirectory')}", f"/var/lib/{one['StateDirectory']}"}
    assert one["ExecStart"].split()[:3] == ["/opt/emdc/venv/bin/emdc", "edge", "run"]
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] in {"yes", "true", "read-only", "tmpfs"}
    assert one["PrivateTmp"] in {"yes", "true"}
    assert one["NoNewPrivileges"] in {"yes", "true"}
    assert one["DevicePolicy"] == "closed"
    assert d["DeviceAllow"] == ["char-gpiochip rw"]
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "PrivateDevices" not in d, "PrivateDevices would hide /dev/gpiochip*"


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/emdc/venv/bin/emdc", sys.executable))
    return unit


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def test_unit_passes_systemd_analyze_verify(verifiable_unit):
    result = subprocess.run([systemd_analyze(), "verify", str(verifiable_unit)], capture_output=True, text=True,
                            cwd=verifiable_unit.parent, timeout=60)
    # verify exits 0 on unknown keys and unparsable values ("..., ignoring"): any output is a finding.
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not findings, "\n".join(findings)


def test_unit_exposure_score_is_low(verifiable_unit):
    analyze = systemd_analyze()
    result = subprocess.run([analyze, "security", "--offline=true", "--threshold=25", str(verifiable_unit)],
                            capture_output=True, text=True, cwd=verifiable_unit.parent, timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {score.group(1)} is above 2.5:\n{result.stdout}"


# ====================================================================== install-edge.sh

FAKE_TOOL = """#!/bin/sh
echo "{name} $*" >> "$FAKE_LOG"
"""
FAKE_DB_ADD = """for last; do :; done
echo "{kind} $last" >> "$FAKE_DB"
"""


@pytest.fixture
def scratch_install(tmp_path: Path) -> dict[str, Any]:
    """A copy of the checkout, a scratch root and stand-ins for the system tools the script calls."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "common", "edge", "backend", "emdc", "deploy/edge"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"groupadd": FAKE_DB_ADD.format(kind="group"), "useradd": FAKE_DB_ADD.format(kind="passwd"),
             "usermod": "", "userdel": "", "groupdel": "", "chown": "", "systemctl": "", "udevadm": ""}
    for name, extra in tools.items():
        (bin_dir / name).write_text(FAKE_TOOL.format(name=name) + extra)
    (bin_dir / "getent").write_text('#!/bin/sh\ngrep -qx "$1 $2" "$FAKE_DB" 2>/dev/null\n')
    (bin_dir / "id").write_text('#!/bin/sh\necho 0\n')  # "root", whoever runs the tests
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log, db = tmp_path / "calls.log", tmp_path / "users.db"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EMDC_ROOT": str(tmp_path / "root"),
           "PYTHON": sys.executable, "FAKE_LOG": str(log), "FAKE_DB": str(db), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PURGE", None)

    def run(*args: str, **extra_env: str) -> list[str]:
        log.write_text("")
        result = subprocess.run(["bash", str(src / "deploy/edge/install-edge.sh"), *args], env={**env, **extra_env},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return log.read_text().splitlines()

    return {"src": src, "root": tmp_path / "root", "run": run}


def test_install_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(EDGE / "install-edge.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_install_script_is_executable():
    assert os.access(EDGE / "install-edge.sh", os.X_OK), "make install-edge runs it directly"


def test_install_upgrade_uninstall_cycle(scratch_install):
    run, root, src = scratch_install["run"], scratch_install["root"], scratch_install["src"]
    etc, unit = root / "etc/emdc", root / "etc/systemd/system/emdc-edge.service"
    venv = root / "opt/emdc/venv"

    # First install: user, group, venv, config from the example, unit enabled but
    # not started while the RabbitMQ URL is still empty.
    calls = run("install")
    assert "groupadd --system gpio" in calls
    assert any(c.startswith("useradd --system") and c.endswith(" emdc") for c in calls)
    assert "usermod --append --groups gpio emdc" in calls
    assert {"systemctl daemon-reload", "systemctl enable emdc-edge.service"} <= set(calls)
    assert not any("restart" in c or "start " in c for c in calls), calls
    assert unit.read_text() == UNIT.read_text()
    assert (etc / "emdc.toml").read_text() == EXAMPLE_TOML.read_text()
    assert (etc / "amqp_url").read_text() == ""
    assert (etc / "amqp_url").stat().st_mode & 0o777 == 0o640
    assert etc.stat().st_mode & 0o777 == 0o750
    assert f"chown root:emdc {etc / 'amqp_url'}" in calls
    probe = subprocess.run([venv / "bin/python", "-c", "import common.config, edge.systemd_notify, gpiozero"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    for module in ("paho", "sqlalchemy"):
        absent = subprocess.run([venv / "bin/python", "-c", f"import {module}"], capture_output=True)
        assert absent.returncode != 0, f"the Pi install must not carry {module}"
    for args in (["--help"], ["edge", "run", "--help"], ["writer", "--help"]):
        listed = subprocess.run([venv / "bin/emdc", *args], capture_output=True, text=True)
        assert listed.returncode == 0 and "Usage:" in listed.stdout, listed.stderr
    assert not (src / "build").exists() and not list(src.glob("*.egg-info")), "built inside the checkout"

    # Second run = upgrade: nothing re-created, local config kept, new code installed, service restarted.
    (etc / "emdc.toml").write_text((etc / "emdc.toml").read_text() + "meter_id = \"garage\"\n")
    (etc / "amqp_url").write_text("amqp://emdc-edge:x@broker:5672/%2F\n")
    notify_src = src / "edge/systemd_notify.py"
    notify_src.write_text(notify_src.read_text() + "\nUPGRADE_MARKER = 1\n")
    calls = run("install")
    assert not any(c.startswith(("useradd", "groupadd")) for c in calls), calls
    assert "systemctl restart emdc-edge.service" in calls
    assert (etc / "emdc.toml").read_text().endswith('meter_id = "garage"\n')
    installed = next(venv.glob("lib/python*/site-packages/edge/systemd_notify.py"))
    assert "UPGRADE_MARKER" in installed.read_text()

    # Uninstall keeps config, state, local drop-ins and user; PURGE=1 removes them, and the group it created.
    (root / "var/lib/emdc").mkdir(parents=True)
    (root / "var/lib/emdc/edge.sqlite3").write_text("state")
    drop_in = root / "etc/systemd/system/emdc-edge.service.d/override.conf"
    drop_in.parent.mkdir()
    drop_in.write_text("[Service]\nEnvironment=EMDC_METER_ID=garage\n")
    calls = run("uninstall")
    assert "systemctl disable --now emdc-edge.service" in calls
    assert not unit.exists() and not (root / "opt/emdc").exists()
    assert (etc / "emdc.toml").exists() and (root / "var/lib/emdc/edge.sqlite3").exists() and drop_in.exists()
    assert not any(c.startswith(("userdel", "groupdel")) for c in calls)
    calls = run("uninstall", PURGE="1")
    assert not etc.exists() and not (root / "var/lib/emdc").exists() and not drop_in.parent.exists()
    assert {"userdel emdc", "groupdel gpio", "systemctl daemon-reload"} <= set(calls)


def test_purge_keeps_a_gpio_group_the_system_had(scratch_install, tmp_path):
    """Raspberry Pi OS ships the group gpio (and its udev rule): the install uses it, and PURGE=1 leaves it."""
    (tmp_path / "users.db").write_text("group gpio\n")
    calls = scratch_install["run"]("install")
    assert not any(c.startswith("groupadd") for c in calls), calls
    calls = scratch_install["run"]("uninstall", PURGE="1")
    assert "userdel emdc" in calls
    assert not any(c.startswith("groupdel") for c in calls), calls


def test_install_completes_where_udev_is_installed_but_not_running(scratch_install, tmp_path):
    """A container or a system booting: the rule is written for the next boot, the install goes on, and
    PURGE=1 removes the rule again."""
    (scratch_install["root"] / "etc/udev").mkdir(parents=True)
    udevadm = tmp_path / "bin/udevadm"
    udevadm.write_text(FAKE_TOOL.format(name="udevadm") + 'if [ "$1" = control ]; then exit 1; fi\n')
    calls = scratch_install["run"]("install")
    rule = scratch_install["root"] / "etc/udev/rules.d/60-emdc-gpio.rules"
    assert 'GROUP="gpio"' in rule.read_text()
    assert "udevadm control --reload" in calls and not any(c.startswith("udevadm trigger") for c in calls), calls
    assert "systemctl enable emdc-edge.service" in calls, "the install went on"
    scratch_install["run"]("uninstall", PURGE="1")
    assert not rule.exists()


# ====================================================================== example configuration

SETTING_LINE = re.compile(r"^(?P<comment>#\s?)?(?P<key>[a-z][a-z0-9_]*) = (?P<value>.+)$")


def example_entries() -> list[tuple[str, bool, str, list[str]]]:
    """(key, active, raw value, comment block above it) for each setting line of the example."""
    lines = EXAMPLE_TOML.read_text().splitlines()
    entries = []
    for i, line in enumerate(lines):
        m = SETTING_LINE.match(line)
        if not m:
            continue
        block = []
        for above in reversed(lines[:i]):
            if not above.startswith("#") or SETTING_LINE.match(above):
                break
            block.insert(0, above.lstrip("# ").strip())
        entries.append((m["key"], m["comment"] is None, m["value"], block))
    return entries


def test_example_documents_every_setting_with_its_help():
    entries = {key: (active, block) for key, active, _value, block in example_entries()}
    for name, _env, _default, help_text in settings_table():
        key = f"{name}_file" if name in SECRET_SETTINGS else name
        assert key in entries, f"{EXAMPLE_TOML.name} does not document {key}"
        documented = " ".join(entries[key][1])
        assert help_text.rstrip(".") in documented, f"{key}: help text missing above it: {help_text!r}"


def test_example_shows_true_defaults():
    defaults = {name: default for name, _env, default, _help in settings_table()}
    for key, active, value, _block in example_entries():
        if not active and key in defaults:
            assert tomllib.loads(f"v = {value}")["v"] == defaults[key], f"{key}: documented default is stale"


def test_example_never_holds_a_secret():
    active = {key for key, is_active, _value, _block in example_entries() if is_active}
    assert not active & SECRET_SETTINGS, "secrets belong in files named by <name>_file"


def test_example_loads_as_shipped_and_fully_uncommented(tmp_path):
    secrets_dir = tmp_path / "etc"
    secrets_dir.mkdir()
    (secrets_dir / "amqp_url").write_text("amqp://emdc-edge:s3cret@broker.example.org:5672/%2F\n")
    (secrets_dir / "mqtt_password").write_text("mqtt-s3cret\n")
    (secrets_dir / "db_url").write_text("mysql+pymysql://emdc:x@mariadb/emdc\n")
    (secrets_dir / "state_url").write_text("mysql+pymysql://emdc:x@mariadb/emdc_state\n")
    (secrets_dir / "ha_token").write_text("eyJ0eXAi.example.token\n")
    text = EXAMPLE_TOML.read_text().replace("/etc/emdc/", f"{secrets_dir}/")

    shipped = tmp_path / "shipped.toml"
    shipped.write_text(text)
    cfg = load_config(shipped, env={})
    assert cfg.amqp_url == "amqp://emdc-edge:s3cret@broker.example.org:5672/%2F"
    assert cfg.declare_topology is False
    assert cfg.state_dir == "/var/lib/emdc"

    # Every commented setting, uncommented, must be valid TOML of the right type.
    known = {name for name, *_ in settings_table()} | {f"{name}_file" for name in SECRET_SETTINGS}
    uncommented = []
    for line in text.splitlines():
        m = SETTING_LINE.match(line)
        uncommented.append(line[len(m["comment"]):] if m and m["comment"] and m["key"] in known else line)
    everything = tmp_path / "everything.toml"
    everything.write_text("\n".join(uncommented) + "\n")
    cfg = load_config(everything, env={})
    assert cfg.mqtt_password == "mqtt-s3cret"


# ====================================================================== docker compose

VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?:[:?-][^}]*)?\}")


def compose_doc(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / name).read_text())


def env_example(commented: bool = True) -> dict[str, str]:
    """Variables of .env.example; with ``commented``, also the commented-out ones."""
    pairs = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        if commented:
            line = line.lstrip("# ").strip()
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            key, value = line.split("=", 1)
            pairs[key] = value
    return pairs


def test_compose_services_and_profiles_split_the_two_hosts():
    services = compose_doc()["services"]
    profiles = {name: set(svc.get("profiles", [])) for name, svc in services.items()}
    assert all(profiles.values()), "every service has a profile, so each host picks its part"
    assert profiles["rabbitmq"] == profiles["rabbitmq-init"] == {"rabbitmq"}
    assert profiles["mosquitto"] == profiles["mosquitto-init"] == profiles["writer"] == {"mqtt"}
    assert profiles["db-writer"] == profiles["mariadb"] == {"db"}
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2.0"
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert profiles[dep] <= profiles[name], f"{name} depends on {dep} from another profile"


def test_compose_writers_run_the_emdc_commands_without_declaring_topology():
    services = compose_doc()["services"]
    assert services["writer"]["command"] == ["emdc", "writer"]
    assert services["db-writer"]["command"] == ["emdc", "db-writer"]
    for name in ("writer", "db-writer"):
        env = services[name]["environment"]
        assert env["EMDC_DECLARE_TOPOLOGY"] == "false"
        assert env["EMDC_STATE_DIR"] == "/app/state"
        assert any(v.endswith(":/app/state") for v in services[name]["volumes"])
        assert services[name]["build"]["dockerfile"] == "deploy/compose/Dockerfile"
        assert (COMPOSE / services[name]["build"]["context"]).resolve() == REPO
    assert services["db-writer"]["healthcheck"]["test"] == ["CMD", "emdc", "db-writer", "--check"]
    assert services["writer"]["environment"]["EMDC_MQTT_USERNAME"] == "emdc-writer"


SECRET_VARIABLES = {f"EMDC_{s.upper()}" for s in SECRET_SETTINGS} | {"MARIADB_PASSWORD", "MARIADB_ROOT_PASSWORD"}
CREDENTIALS = re.compile(r"://[^/@\s]+:[^/@\s]+@|\$\{\w*PASS")  # user:password@ in a URL, or a password variable


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.tls-standby.yml",
                                  "docker-compose.tls-cluster.yml"])
def test_compose_hands_secrets_over_as_files_only(name):
    """No secret in any environment: each secret setting comes as its _FILE form, naming a mounted secret."""
    doc, base = compose_doc(name), compose_doc()
    for svc_name, svc in doc["services"].items():
        env = svc.get("environment", {})
        assert not SECRET_VARIABLES & set(env), f"{svc_name}: a secret in the environment"
        assert not [v for v in map(str, env.values()) if CREDENTIALS.search(v)], f"{svc_name}: credentials in a value"
        standby = compose_doc("docker-compose.standby.yml")["services"]
        mounted = {*svc.get("secrets", []), *{**standby, **base["services"]}.get(svc_name, {}).get("secrets", [])}
        for key, value in env.items():
            if key.endswith("_FILE") and key[:-5] in SECRET_VARIABLES:
                assert value.startswith("/run/secrets/") and value.rpartition("/")[2] in mounted, f"{svc_name}: {key}"
    assert not re.search(r"\$\{\w*PASS", (COMPOSE / name).read_text()), "a password interpolated from .env"


def test_compose_limits_every_services_memory():
    for name, svc in compose_doc()["services"].items():
        assert re.fullmatch(r"\d+[mg]", str(svc.get("mem_limit", ""))), f"{name} has no memory limit"


def test_compose_secret_files_are_the_ones_init_makes(tmp_path):
    compose_dir = scratch_compose(tmp_path)
    declared = compose_doc()["secrets"]
    for name, secret in declared.items():
        assert (compose_dir / secret["file"]).is_file(), f"init does not make {secret['file']} ({name})"
    for name, svc in compose_doc()["services"].items():
        for volume in svc.get("volumes", []):
            if volume.startswith("./secrets/"):
                assert (compose_dir / volume.split(":")[0]).is_dir(), f"{name}: init does not make {volume}"


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.tls.yml"])
def test_compose_references_resolve(name):
    """Bind-mount sources exist, named volumes are declared, EMDC_* variables are real settings."""
    doc, base = compose_doc(name), compose_doc()
    settings = {env for _n, env, _d, _h in settings_table()}
    settings |= {f"EMDC_{s.upper()}_FILE" for s in SECRET_SETTINGS} | {"EMDC_CONFIG"}
    for svc_name, svc in doc["services"].items():
        assert svc_name in base["services"], f"{name} overrides unknown service {svc_name}"
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                path = COMPOSE / source
                if {"certs", "secrets"} & set(path.relative_to(COMPOSE).parts):
                    continue  # made by the operator (certs/README.md) or render_secrets.py init; git-ignored
                assert path.exists(), f"{svc_name}: {source} does not exist"
            else:
                assert source in base["volumes"], f"{svc_name}: volume {source} is not declared"
            assert target.startswith("/")
        for secret in svc.get("secrets", []):
            assert secret in base["secrets"], f"{svc_name}: secret {secret} is not declared"
        for key in svc.get("environment", {}):
            if key.startswith("EMDC_"):
                assert key in settings, f"{svc_name}: {key} is not an EMDC setting"


SCALING_OVERLAYS = ("docker-compose.standby.yml", "docker-compose.cluster.yml")


@pytest.mark.parametrize("name", SCALING_OVERLAYS)
def test_scaling_overlays_resolve_and_harden_their_services(name, tmp_path):
    """What the standby and cluster files add: mounts that exist, declared volumes and secrets that init makes,
    real settings, a memory limit and a profile of the host that runs it, and secrets as files only."""
    doc, base = compose_doc(name), compose_doc()
    compose_dir = scratch_compose(tmp_path)
    settings = {env for _n, env, _d, _h in settings_table()} | {f"EMDC_{s.upper()}_FILE" for s in SECRET_SETTINGS}
    volumes, secrets = {**base["volumes"], **(doc.get("volumes") or {})}, {**base["secrets"], **doc["secrets"]}
    for secret in doc["secrets"].values():
        assert (compose_dir / secret["file"]).is_file(), f"init does not make {secret['file']}"
    for svc_name, svc in doc["services"].items():
        full = {**base["services"].get(svc_name, {}), **svc}
        assert re.fullmatch(r"\d+[mg]", str(full.get("mem_limit", ""))), f"{svc_name} has no memory limit"
        assert set(full.get("profiles", [])) in ({"rabbitmq"}, {"mqtt"}), svc_name
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert (COMPOSE / source).exists() if source.startswith(".") else source in volumes, f"{svc_name}: {source}"
            assert target.startswith("/")
        assert set(svc.get("secrets", [])) <= set(secrets), svc_name
        env = svc.get("environment", {})
        assert not SECRET_VARIABLES & set(env), f"{svc_name}: a secret in the environment"
        assert {k for k in env if k.startswith("EMDC_")} <= settings, svc_name


def test_the_standby_writer_shares_the_active_ones_state_in_mariadb():
    base, doc = compose_doc()["services"], compose_doc("docker-compose.standby.yml")["services"]
    active, standby = {**base["writer"], **doc["writer"]}, doc["writer-standby"]
    for svc in (doc["writer"], standby):
        assert svc["environment"]["EMDC_STATE_URL_FILE"] == "/run/secrets/writer_state_url"
        assert svc["depends_on"]["mariadb"] == {"condition": "service_healthy"}
        assert svc["image"] == base["db-writer"]["image"], "an image with the MariaDB driver"
    assert standby["command"] == active["command"]
    assert {k: v for k, v in standby["environment"].items() if k != "EMDC_STATE_URL_FILE"} == base["writer"][
        "environment"], "the same writer settings as the active one"
    assert standby["volumes"] != active["volumes"], "a state dir of its own (lock, heartbeat)"
    assert set(base["writer"]["secrets"]) <= set(standby["secrets"])


def test_the_cluster_variant_runs_three_nodes_that_find_each_other_with_one_cookie():
    base, doc = compose_doc()["services"], compose_doc("docker-compose.cluster.yml")["services"]
    nodes = {name: {**base.get(name, {}), **svc} for name, svc in doc.items() if name.startswith("rabbitmq")
             and name != "rabbitmq-cookie"}
    assert sorted(nodes) == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    conf = (COMPOSE / "rabbitmq/40-cluster.conf").read_text()
    listed = set(re.findall(r"classic_config\.nodes\.\d+ = rabbit@([\w-]+)", conf))
    assert listed == {svc["hostname"] for svc in nodes.values()}, "the nodes the config lists are the services"
    for name, svc in nodes.items():
        mounts = [*base.get(name, {}).get("volumes", []), *svc["volumes"]]
        assert "rabbitmq-cookie:/var/lib/rabbitmq-cookie:ro" in mounts and svc["environment"]["HOME"] == \
            "/var/lib/rabbitmq-cookie", f"{name} reads the shared cookie"
        assert "./rabbitmq/40-cluster.conf:/etc/rabbitmq/conf.d/40-cluster.conf:ro" in mounts
        assert any(m.endswith(":/var/lib/rabbitmq") for m in mounts), f"{name} keeps its data in a volume"
        assert svc["depends_on"]["rabbitmq-cookie"] == {"condition": "service_completed_successfully"}
        assert "rabbitmq-any" in svc["networks"]["default"]["aliases"]
    assert doc["rabbitmq-cookie"]["secrets"] == ["erlang_cookie"]


def test_the_erlang_cookie_is_installed_readable_by_rabbitmq_only(tmp_path):
    compose_dir = scratch_compose(tmp_path)
    out = tmp_path / "cookie"
    source = compose_dir / "secrets/erlang/cookie"
    assert render_secrets.main(["erlang-cookie", str(source), str(out)], compose_dir=compose_dir) == 0
    assert (out / ".erlang.cookie").read_text() == source.read_text().strip()
    assert (out / ".erlang.cookie").stat().st_mode & 0o777 == 0o400


def test_compose_variables_are_all_in_env_example():
    used = {"RABBITMQ_HOST"}  # read by render_secrets.py init for the writers' URL files
    for name in {name for files in TLS_LAYOUTS.values() for name in files}:
        used |= set(VARIABLE.findall((COMPOSE / name).read_text()))
    documented = set(env_example())
    assert used - documented == set(), "add these to .env.example"
    unused = documented - used - {"COMPOSE_PROFILES", "COMPOSE_FILE"}
    assert unused == set(), "not used by any compose file"
    assert not [k for k in documented if "PASSWORD" in k], "passwords are files in secrets/, never .env variables"


def test_compose_config_mounts_match_broker_configs():
    """Paths named inside the broker configs are where compose mounts things."""
    services = compose_doc()["services"]
    conf = (COMPOSE / "rabbitmq/20-emdc.conf").read_text()
    definitions = re.search(r"^load_definitions = (\S+)$", conf, re.M)[1]
    assert f"rabbitmq-definitions:{Path(definitions).parent}:ro" in services["rabbitmq"]["volumes"]
    assert "rabbitmq-definitions:/out" in services["rabbitmq-init"]["volumes"]
    assert "/out/" + Path(definitions).name in services["rabbitmq-init"]["command"]
    for init, kind in (("rabbitmq-init", "rabbitmq"), ("mosquitto-init", "mosquitto")):
        command = services[init]["command"]
        mount = command[command.index("--secrets") + 1]
        assert f"./secrets/{kind}:{mount}:ro" in services[init]["volumes"]
    mosquitto = MOSQUITTO_CONF.read_text()
    for key in ("password_file", "acl_file"):
        path = re.search(rf"^{key} (\S+)$", mosquitto, re.M)[1]
        assert f"mosquitto-secrets:{Path(path).parent}:ro" in services["mosquitto"]["volumes"]
    tls = compose_doc("docker-compose.tls.yml")["services"]
    include_dir = re.search(r"^include_dir (\S+)$", mosquitto, re.M)[1]
    assert f"./mosquitto/tls:{include_dir}:ro" in tls["mosquitto"]["volumes"]
    assert (COMPOSE / "mosquitto/config" / Path(include_dir).name).is_dir(), "mosquitto refuses a missing include_dir"
    for cert in re.findall(r"^(?:certfile|keyfile) (\S+)$", (COMPOSE / "mosquitto/tls/tls.conf").read_text(), re.M):
        assert any(v.endswith(f":{Path(cert).parent}:ro") for v in tls["mosquitto"]["volumes"])
    for cert in re.findall(r"^ssl_options\.\w+ = (\S+)$", (COMPOSE / "rabbitmq/30-tls.conf").read_text(), re.M):
        if cert.startswith("/"):
            assert any(v.endswith(f":{Path(cert).parent}:ro") for v in tls["rabbitmq"]["volumes"])


def listeners(directory: Path) -> list[str]:
    return [line for conf in directory.glob("*.conf") for line in conf.read_text().splitlines()
            if line.startswith("listener ")]


def test_tls_overlay_closes_the_plain_listeners():
    """With TLS, RabbitMQ opens no plain listener and Mosquitto's conf.d (with 1883) is replaced by tls/."""
    assert re.search(r"^listeners\.tcp = none$", (COMPOSE / "rabbitmq/30-tls.conf").read_text(), re.M)
    assert not listeners(MOSQUITTO_CONF.parent) and listeners(MOSQUITTO_CONF.parent / "conf.d") == ["listener 1883"]
    assert listeners(COMPOSE / "mosquitto/tls") == ["listener 8883"]


# Every layout with TLS, its files in the order install-server.md and scaling.md give them.
TLS_LAYOUTS = {
    "single": ("docker-compose.yml", "docker-compose.tls.yml"),
    "standby": ("docker-compose.yml", "docker-compose.standby.yml", "docker-compose.tls.yml",
                "docker-compose.tls-standby.yml"),
    "cluster": ("docker-compose.yml", "docker-compose.cluster.yml", "docker-compose.tls.yml",
                "docker-compose.tls-cluster.yml"),
    "standby+cluster": ("docker-compose.yml", "docker-compose.standby.yml", "docker-compose.cluster.yml",
                        "docker-compose.tls.yml", "docker-compose.tls-standby.yml", "docker-compose.tls-cluster.yml"),
}


def rabbitmq_listeners(conf: str) -> list[str]:
    return re.findall(r"^(listeners\.(?:tcp|ssl)\S*) = (\S+)$", conf, re.M)


@pytest.mark.parametrize("layout", TLS_LAYOUTS)
def test_tls_covers_every_broker_node_and_writer_of_the_layout(tmp_path, layout):
    """``compose config`` of each layout with TLS: every RabbitMQ node loads 30-tls.conf (plain AMQP closed, so
    nothing listens on the plain port compose still maps), serves the certificates and publishes 5671 on its own
    host port; every writer reads an amqps:// URL with the CA, and the MQTT writers MQTT over TLS."""
    compose_dir = scratch_compose(tmp_path)
    result = compose_config(compose_dir / ".env", *TLS_LAYOUTS[layout], project=compose_dir, quiet=False)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    nodes = {name: svc for name, svc in services.items() if str(svc.get("image", "")).startswith("rabbitmq:")}
    writers = {name: svc for name, svc in services.items() if svc.get("command", [""])[0] == "emdc"}
    assert len(nodes) == (3 if "cluster" in layout else 1)
    assert len(writers) == (3 if "standby" in layout else 2)
    amqps_ports = []
    for name, node in nodes.items():
        mounts = dict(reversed(v.split(":")[:2]) for v in node["volumes"])
        assert mounts.get("/etc/rabbitmq/conf.d/30-tls.conf") == str(compose_dir / "rabbitmq/30-tls.conf"), name
        assert mounts.get("/etc/rabbitmq/certs") == str(compose_dir / "certs/rabbitmq"), name
        # What the node's conf.d says about listeners, all files together: AMQPS only.
        opened = [pair for target, source in mounts.items() if target.startswith("/etc/rabbitmq/conf.d/")
                  for pair in rabbitmq_listeners(Path(source).read_text())]
        assert sorted(opened) == [("listeners.ssl.default", "5671"), ("listeners.tcp", "none")], name
        published = [port.removesuffix("/tcp").rsplit(":", 2) for port in node["ports"]]
        amqps_ports += [host for _bind, host, target in published if target == "5671"]
        assert any(target == "5671" for *_rest, target in published), f"{name} publishes no AMQPS port"
    assert len(amqps_ports) == len(set(amqps_ports)) == len(nodes), "each node on a host port of its own"
    for name, writer in writers.items():
        env = writer["environment"]
        url_file = env["EMDC_AMQP_URL_FILE"]
        secret = config["secrets"][url_file.rpartition("/")[2]]
        assert url_file.rpartition("/")[2] in [s["source"] for s in writer["secrets"]], name
        assert Path(secret["file"]).read_text().startswith("amqps://"), f"{name} reads a plain AMQP URL"
        assert env["EMDC_AMQP_CA_FILE"] == "/app/certs/ca.crt", name
        assert f"{compose_dir / 'certs/ca.crt'}:/app/certs/ca.crt:ro" in writer["volumes"], name
        if writer["command"] == ["emdc", "writer"]:
            assert (env["EMDC_MQTT_TLS"], env["EMDC_MQTT_PORT"], env["EMDC_MQTT_CA_FILE"]) == (
                "true", "8883", "/app/certs/ca.crt"), f"{name} speaks plain MQTT"


def compose_config(env_file: Path, *files: str, project: Path = COMPOSE,
                   quiet: bool = True) -> subprocess.CompletedProcess[str]:
    """``compose config`` by whichever compose implementation is installed (no engine needed)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        compose = ["docker-compose"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    args = [*compose, "--env-file", str(env_file), "--project-directory", str(project)]
    for name in files:
        args += ["-f", str(project / name)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "RABBITMQ_", "MQTT", "MARIADB_"))}
    return subprocess.run([*args, "config", *(["-q"] if quiet else [])], capture_output=True, text=True, cwd=project,
                          env=env)


def scratch_compose(tmp_path: Path) -> Path:
    """A copy of deploy/compose after ``render_secrets.py init`` (with a Pi), as an operator's checkout has it."""
    compose_dir = tmp_path / "compose"
    shutil.copytree(COMPOSE, compose_dir, ignore=shutil.ignore_patterns(".env", "secrets"))
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    assert render_secrets.main(["add-edge", "garage", "--host", "broker.example.org"], compose_dir=compose_dir) == 0
    return compose_dir


def secret_values(compose_dir: Path) -> list[str]:
    """Every password in the secrets directory."""
    return [p.read_text().strip() for p in render_secrets.all_password_files(compose_dir / "secrets")]


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.tls.yml"],
                                   ["docker-compose.yml", "docker-compose.standby.yml"],
                                   ["docker-compose.yml", "docker-compose.cluster.yml"],
                                   list(TLS_LAYOUTS["standby+cluster"])])
def test_compose_files_validate_and_show_no_secret(tmp_path, files, capsys):
    compose_dir = scratch_compose(tmp_path)
    capsys.readouterr()  # add-edge printed that Pi's URL
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    assert not any(p in capsys.readouterr().out for p in secret_values(compose_dir)), "init printed a password"
    assert compose_config(compose_dir / ".env", *files, project=compose_dir).returncode == 0
    result = compose_config(compose_dir / ".env", *files, project=compose_dir, quiet=False)
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    passwords = secret_values(compose_dir)
    assert len(passwords) == 8 and not [p for p in passwords if p in shown], "a secret in `compose config`"
    assert "/run/secrets/writer_amqp" in shown


# ====================================================================== Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (COMPOSE / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    args = {k: v for k, _, v in (a.partition("=") for i, a in ins if i == "ARG")}
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2, "multi-stage: build, then a runtime without build leftovers"
    base = froms[-1].replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base)
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "--no-cache-dir" in runs
    assert args["EXTRAS"] == "backend", "the writer image installs emdc[backend] only"
    user = [a for i, a in ins if i == "USER"][-1]
    assert user not in {"root", "0"}
    health = next(a for i, a in ins if i == "HEALTHCHECK")
    assert health.endswith('CMD ["emdc", "writer", "--check"]')
    assert next(a for i, a in ins if i == "CMD") == '["emdc", "writer"]'
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "EMDC_STATE_DIR=/app/state" in env
    assert next(a for i, a in ins if i == "VOLUME") == '["/app/state"]'


def test_packaging_paths_stay_in_step_with_pyproject():
    """The Dockerfile, its ignore file and install-edge.sh copy every package setuptools looks for."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {a.split()[0] for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from")}
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text()
    script = (EDGE / "install-edge.sh").read_text()
    paths = re.search(r"PACKAGE_PATHS=\(([^)]*)\)", script)[1].split()
    for package in packages:
        assert package in copied and f"!{package}/" in ignore and package in paths, package
    if pyproject["project"].get("readme"):
        assert any(pyproject["project"]["readme"] in a.split() for i, a in dockerfile_instructions() if i == "COPY")


def test_dockerfile_install_step_in_a_fresh_venv(tmp_path):
    """Replay the build stage: its COPYs, then its pip command, in a new venv; check the result."""
    ins = dockerfile_instructions()
    build_stage = ins[: [i for i, (word, _) in enumerate(ins) if word == "FROM"][1]]
    args = {k: v for k, _, v in (a.partition("=") for i, a in build_stage if i == "ARG")}
    context = tmp_path / "src"
    context.mkdir()
    for word, rest in build_stage:
        if word == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"
                target = context / dest / source if len(sources) > 1 or dest.endswith("/") else context / dest
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(REPO / source, target)
    pip_step = next(s for _, rest in build_stage for s in rest.split("&&") if "pip install" in s)
    pip_args = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], pip_step))
    pip_args = pip_args[pip_args.index("install") + 1:]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    result = subprocess.run([venv / "bin/pip", "install", *pip_args], cwd=context, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run = dict(capture_output=True, text=True, timeout=60, env={"PATH": f"{venv}/bin:/usr/bin:/bin"})
    help_ = subprocess.run([venv / "bin/emdc", "--help"], **run)
    assert help_.returncode == 0, help_.stderr
    no_gpio = subprocess.run([venv / "bin/python", "-c", "import gpiozero"], **run)
    assert no_gpio.returncode != 0, "the backend image must not carry the edge's GPIO stack"
    # The HEALTHCHECK's meaning: healthy iff the writer's heartbeat is fresh.
    state = tmp_path / "state"
    state.mkdir()
    check = [venv / "bin/emdc", "writer", "--check"]
    env = {**run["env"], "EMDC_STATE_DIR": str(state)}
    assert subprocess.run(check, **{**run, "env": env}).returncode != 0, "no heartbeat yet: unhealthy"
    (state / "writer.heartbeat").touch()
    fresh = subprocess.run(check, **{**run, "env": env})
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    old = time.time() - 3600
    os.utime(state / "writer.heartbeat", (old, old))
    assert subprocess.run(check, **{**run, "env": env}).returncode != 0, "stale heartbeat: unhealthy"


# ====================================================================== render_secrets.py


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


def test_render_secrets_examples_hold():
    """Its docstring examples: deploy/compose is no package, so --doctest-modules does not collect it."""
    result = doctest.testmod(render_secrets)
    assert result.attempted and not result.failed


@pytest.mark.parametrize("weak", ["aaaaaaaaaaaaaaaaaaaaaaaa", "abcabcabcabcabcabcabc", "0123456789ab", "passw0rd",
                                  # Long, but a short period, an ascending run or a word twice: patterns.
                                  "ab" * 34, "abc" * 14, "0123456789abcdef", "passwordpassword12345678",
                                  "zyxwvutsrqponmlkjihgfedcba", "Tr0ub4dor" * 3, "aabbccddeeffgghh" * 2])
def test_render_refuses_weak_passwords_with_one_line(tmp_path, weak):
    secrets_dir = tmp_path / "rabbitmq"
    for user in json.loads(DEFINITIONS.read_text())["users"]:
        write_secret(secrets_dir / user["name"], random_password())
    write_secret(secrets_dir / "emdc-writer", weak)
    with pytest.raises(render_secrets.RenderError, match=r"emdc-writer is too weak \(about \d+ bits, 64 needed[;)]"):
        render_secrets.render_definitions(json.loads(DEFINITIONS.read_text()), secrets_dir)


def test_render_refuses_missing_reused_and_url_unsafe_passwords(tmp_path, capsys):
    template = json.loads(DEFINITIONS.read_text())
    secrets_dir = tmp_path / "rabbitmq"
    with pytest.raises(render_secrets.RenderError, match=r"emdc-admin is missing: run python3 render_secrets.py init"):
        render_secrets.render_definitions(template, secrets_dir)
    for user in template["users"]:
        write_secret(secrets_dir / user["name"], random_password())
    write_secret(secrets_dir / "edges" / "garage", (secrets_dir / "emdc-writer").read_text().strip())
    with pytest.raises(render_secrets.RenderError, match=r"emdc-writer and .*edges/garage hold the same password"):
        render_secrets.render_definitions(template, secrets_dir)
    write_secret(secrets_dir / "edges" / "garage", "has@and/in-it" + random_password())
    assert render_secrets.main(["rabbitmq", str(DEFINITIONS), str(tmp_path / "d.json"), "--secrets",
                                str(secrets_dir)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "edges/garage may only hold A-Z a-z 0-9 . _ ~ -" in error
    assert "has@and" not in error, "the error shows the password"


def test_render_writes_private_files_with_hashes_only(tmp_path):
    template = json.loads(DEFINITIONS.read_text())
    secrets_dir = tmp_path / "rabbitmq"
    passwords = {user["name"]: random_password() for user in template["users"]}
    for name, value in passwords.items():
        write_secret(secrets_dir / name, value)
    out = tmp_path / "out" / "definitions.json"
    assert render_secrets.main(["rabbitmq", str(DEFINITIONS), str(out), "--secrets", str(secrets_dir)]) == 0
    text = out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600
    assert not any(p in text for p in passwords.values()), "plain password in the output"
    assert "edge_accounts" not in text and {u["name"] for u in json.loads(text)["users"]} == set(passwords)
    mosquitto_dir = tmp_path / "mosquitto"
    write_secret(mosquitto_dir / "emdc-writer", secret := random_password())
    assert render_secrets.main(["mosquitto", str(COMPOSE / "mosquitto/config/acl"), str(tmp_path / "m"),
                                "emdc-writer", "--secrets", str(mosquitto_dir)]) == 0
    assert (tmp_path / "m/passwd").read_text().startswith("emdc-writer:$7$101$")
    assert secret not in (tmp_path / "m/passwd").read_text()
    assert (tmp_path / "m/acl").read_text() == (COMPOSE / "mosquitto/config/acl").read_text()
    assert (tmp_path / "m/acl").stat().st_mode & 0o777 == 0o600


def test_init_generates_strong_distinct_passwords_and_keeps_them(tmp_path, capsys):
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    shutil.copy(COMPOSE / ".env.example", compose_dir)
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    secrets_dir = compose_dir / "secrets"
    files = render_secrets.all_password_files(secrets_dir)
    assert {str(p.relative_to(secrets_dir)) for p in files} == set(render_secrets.PASSWORDS)
    values = [p.read_text().strip() for p in files]
    assert len(set(values)) == len(values) and all(render_secrets.strength_bits(v) >= 128 for v in values)
    for _ in range(200):  # what init generates always passes
        render_secrets.check_password("generated", render_secrets.secrets.token_hex(24))
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files) and secrets_dir.stat().st_mode & 0o777 == 0o700
    assert not any(v in capsys.readouterr().out for v in values)
    writer_url = (secrets_dir / "writer/amqp_url").read_text().strip()
    writer_password = (secrets_dir / "rabbitmq/emdc-writer").read_text().strip()
    assert writer_url == f"amqp://emdc-writer:{writer_password}@rabbitmq:5672/%2F"
    assert load_config(env={"EMDC_AMQP_URL_FILE": str(secrets_dir / "writer/amqp_url")}).amqp_url == writer_url
    if os.geteuid() == 0:
        assert (secrets_dir / "writer/amqp_url").stat().st_uid == render_secrets.WRITER_UID
    # Run again with another RabbitMQ host: passwords kept, URLs follow .env.
    env_file = compose_dir / ".env"
    env_file.write_text(env_file.read_text().replace("RABBITMQ_HOST=rabbitmq", "RABBITMQ_HOST=broker.lan"))
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    assert [p.read_text().strip() for p in files] == values
    assert "@broker.lan:5671/" in (secrets_dir / "db-writer/amqps_url").read_text()


def test_init_moves_the_passwords_of_an_old_env_into_files(tmp_path):
    """An install of the .env-password layout keeps every password, the shared edge user's included."""
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    shutil.copy(COMPOSE / ".env.example", compose_dir)
    old = {var: random_password() for var in render_secrets.LEGACY_VARIABLES}
    (compose_dir / ".env").write_text("COMPOSE_PROFILES=rabbitmq\nRABBITMQ_HOST=rabbitmq\n"
                                      + "".join(f"{k}={v}\n" for k, v in old.items()))
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    for var, name in render_secrets.LEGACY_VARIABLES.items():
        assert (compose_dir / "secrets" / name).read_text().strip() == old[var]
    env_text = (compose_dir / ".env").read_text()
    assert "PASSWORD" not in env_text and "COMPOSE_PROFILES=rabbitmq" in env_text


def test_add_edge_prints_only_that_pis_url(tmp_path, capsys):
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    shutil.copy(COMPOSE / ".env.example", compose_dir)
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    others = secret_values(compose_dir)
    capsys.readouterr()
    assert render_secrets.main(["add-edge", "garage", "--host", "broker.example.org", "--tls"],
                               compose_dir=compose_dir) == 0
    out = capsys.readouterr().out
    password = (compose_dir / "secrets/rabbitmq/edges/garage").read_text().strip()
    assert out.splitlines()[-1] == f"amqps://emdc-edge-garage:{password}@broker.example.org:5671/%2F"
    assert "rabbitmqctl import_definitions" in out and not any(p in out for p in others)
    assert render_secrets.main(["add-edge", "garage"], compose_dir=compose_dir) == 1
    assert "that meter has a Pi account already" in capsys.readouterr().err
    assert render_secrets.main(["add-edge", "a.b"], compose_dir=compose_dir) == 1
    assert render_secrets.main(["remove-edge", "garage"], compose_dir=compose_dir) == 0
    assert "delete_user emdc-edge-garage" in capsys.readouterr().out
    assert not (compose_dir / "secrets/rabbitmq/edges/garage").exists()


@pytest.mark.parametrize("meter", ["main", "garage-2", "a_b", "x" * 64, "", "a.b", "a b", "x" * 65, "#", "ü"])
def test_render_takes_the_meter_ids_the_edge_takes(meter):
    from common.message import MessageError, validate_meter_id
    try:
        validate_meter_id(meter)
        valid = True
    except MessageError:
        valid = False
    assert bool(render_secrets.METER_RE.match(meter)) == valid


# ====================================================================== RabbitMQ definitions


def test_definitions_match_common_topology():
    d = json.loads(DEFINITIONS.read_text())
    exchange = Config().exchange
    dlx = topology.dead_letter_exchange(exchange)
    consumers = {Config().queue: topology.WRITER_BINDINGS, Config().db_queue: topology.DB_WRITER_BINDINGS}

    # The dead-letter exchange is a topic exchange: RabbitMQ checks topic permissions on topic exchanges
    # only, and those keep each writer to its own dead-letter queue.
    assert {(x["name"], x["type"], x["durable"], x["auto_delete"], x["internal"]) for x in d["exchanges"]} == {
        (exchange, "topic", True, False, False), (dlx, "topic", True, False, False)}
    expected_queues = {}
    expected_bindings = set()
    for q, keys in consumers.items():
        expected_queues[q] = topology.queue_arguments(exchange, q)
        expected_queues[topology.dead_letter_queue(q)] = {}
        expected_queues[topology.lease_queue(q)] = {}
        expected_bindings |= {(exchange, q, key) for key in keys}
        expected_bindings.add((dlx, topology.dead_letter_queue(q), q))
    statuses = topology.status_queue(Config().queue)  # the MQTT writer's alone
    expected_queues[statuses] = topology.STATUS_QUEUE_ARGUMENTS
    expected_bindings |= {(exchange, statuses, key) for key in topology.STATUS_BINDINGS}
    assert {q["name"]: q["arguments"] for q in d["queues"]} == expected_queues
    assert all(q["durable"] and not q["auto_delete"] for q in d["queues"])
    assert {(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]} == expected_bindings
    assert all(b["destination_type"] == "queue" for b in d["bindings"])


def test_quorum_definitions_declare_what_the_writers_declare(tmp_path):
    secrets_dir = tmp_path / "rabbitmq"
    for user in json.loads(DEFINITIONS.read_text())["users"]:
        write_secret(secrets_dir / user["name"], random_password())
    d = render_secrets.render_definitions(json.loads(DEFINITIONS.read_text()), secrets_dir, "quorum")
    exchange = Config().exchange
    expected = {}
    for q in (Config().queue, Config().db_queue):
        expected[q] = topology.queue_arguments(exchange, q, "quorum")
        expected[topology.dead_letter_queue(q)] = topology.dead_letter_queue_arguments("quorum")
        expected[topology.lease_queue(q)] = {}  # the lease needs an exclusive consumer: classic
    expected[topology.status_queue(Config().queue)] = topology.STATUS_QUEUE_ARGUMENTS  # replaceable: classic
    assert {q["name"]: q["arguments"] for q in d["queues"]} == expected
    # A quorum queue's overflow comes from its policy; at-least-once dead-lettering needs reject-publish.
    for q in (Config().queue, Config().db_queue):
        assert [p["definition"]["overflow"] for p in d["policies"] if re.search(p["pattern"], q)] == [
            "reject-publish"]


def test_definitions_cap_every_queue_in_messages_and_bytes():
    """The queues the definitions declare, and those a partition's writer declares (``<queue>.<k>``, with its
    dead letters and lease): one policy each, capping messages and bytes."""
    d = json.loads(DEFINITIONS.read_text())
    names = [q["name"] for q in d["queues"]]
    for k in (0, 1, 9, 10, 999):
        q = topology.partition_queue(Config().queue, k, 1000)
        names += [q, topology.dead_letter_queue(q), topology.lease_queue(q), topology.status_queue(q)]
    for name in names:
        caps = [p["definition"] for p in d["policies"] if re.search(p["pattern"], name)]
        assert len(caps) == 1, f"{name}: one policy must apply"
        assert caps[0]["max-length"] > 0 and 0 < caps[0]["max-length-bytes"] <= 256 * 2**20, name
    for name in ("queue_mqtt_writer.x", "queue_mqtt_writer.1.x", "queue_mqtt_writerx"):
        assert not [p for p in d["policies"] if re.search(p["pattern"], name)], name


def test_definitions_grant_least_privilege():
    d = json.loads(DEFINITIONS.read_text())
    users = {u["name"]: u for u in d["users"]}
    assert "guest" not in users and "emdc-edge" not in users, "Pis get their own users (edge_accounts)"
    assert [u for u, v in users.items() if v["tags"]] == ["emdc-admin"]
    perms = {p["user"]: p for p in d["permissions"]}
    assert set(perms) == set(users)
    for name in set(users) - {"emdc-admin", "emdc-writer"}:
        assert perms[name]["configure"] == "^$", f"{name} may not declare or delete anything"
    for shape in d["edge_accounts"].values():
        assert shape["permissions"] == {"configure": "^$", "write": "^EMDC$", "read": "^$"}
    # Its queue, and the lease that makes it the one writer counting it; with partitions each partition's.
    assert perms["emdc-writer"]["read"] == f"^(EMDC(\\.dead)?|{Config().queue}(\\.\\d+)?(\\.active|\\.status)?)$"
    # A partition's writer declares its queues (not the unpartitioned ones, nor any exchange).
    assert perms["emdc-writer"]["configure"] == f"^{Config().queue}\\.\\d+(\\.dead|\\.active|\\.status)?$"
    assert perms["emdc-db-writer"]["read"] == f"^{Config().db_queue}(\\.active)?$"


def test_broker_message_size_limit_covers_the_message_schema():
    from common.message import MAX_BODY_BYTES
    limit = int(re.search(r"^max_message_size = (\d+)$", (COMPOSE / "rabbitmq/20-emdc.conf").read_text(), re.M)[1])
    assert MAX_BODY_BYTES <= limit <= 16 * 1024


def rabbitmq_schema_keys() -> list[re.Pattern[str]]:
    """Every config key the local RabbitMQ's cuttlefish schemas accept, as patterns."""
    need("rabbitmqctl")
    roots = [Path(p) for p in (os.environ.get("RABBITMQ_HOME", ""), "/usr/lib/rabbitmq", "/opt/rabbitmq") if p]
    schemas = {p for root in roots if root.is_dir() for p in root.rglob("*.schema")}
    assert schemas, "no RabbitMQ cuttlefish schema found"
    keys = set()
    for schema in schemas:
        keys |= set(re.findall(r'\{mapping,\s*"([^"]+)"', schema.read_text(errors="replace")))
    return [re.compile("^" + re.sub(r"\\\$\w+", r"[^.]+", re.escape(k)) + "$") for k in keys]


@pytest.mark.parametrize("conf", ["20-emdc.conf", "30-tls.conf"])
def test_rabbitmq_conf_keys_are_known_to_rabbitmq(conf):
    patterns = rabbitmq_schema_keys()
    lines = (COMPOSE / "rabbitmq" / conf).read_text().splitlines()
    # Commented-out settings too: they are meant to be switched on.
    keys = [m[1] for line in lines if (m := re.match(r"^#?\s*([a-z_][\w.]*) = \S", line))]
    assert keys
    for key in keys:
        assert any(p.match(key) for p in patterns), f"{conf}: RabbitMQ does not know {key}"


# ====================================================================== Mosquitto


@dataclasses.dataclass
class Mosquitto:
    port: int
    tls_port: int
    passwords: dict[str, str]
    ca: Path
    log: Path


def run_recipe(certs: Path) -> None:
    """Make certificates with the recipe of certs/README.md (minus its sudo lines)."""
    readme = (COMPOSE / "certs/README.md").read_text()
    script = re.search(r"```sh\n(.*?)```", readme, re.S)[1]
    script = "\n".join(line for line in script.splitlines() if not line.startswith("sudo "))
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=certs, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def mosquitto_broker(tmp_path_factory) -> Iterator[Mosquitto]:
    """deploy/compose/mosquitto as compose runs it, moved to a temp dir and free ports, with TLS on."""
    need("openssl")
    root = tmp_path_factory.mktemp("mosquitto")
    shutil.copytree(COMPOSE / "mosquitto/config", root / "config")
    for sub in ("data", "log", "secrets", "certs"):
        (root / sub).mkdir()
    run_recipe(root / "certs")
    shutil.copytree(root / "certs/mosquitto", root / "tls-certs")
    # An observer that may read everything, so the test can see what the ACL drops.
    acl = root / "config/acl"
    acl.write_text(acl.read_text() + "\nuser emdc-test-observer\ntopic read #\n")
    passwords = {u: random_password() for u in ("emdc-writer", "homeassistant", "emdc-test-observer")}
    for user, password in passwords.items():
        write_secret(root / "passwords" / user, password)
    assert render_secrets.main(["mosquitto", str(acl), str(root / "secrets"), *passwords, "--secrets",
                                str(root / "passwords")]) == 0
    # The TLS listener next to the plain one (docker-compose.tls.yml mounts it over conf.d/, closing the plain one).
    shutil.copy(COMPOSE / "mosquitto/tls/tls.conf", root / "config/conf.d/tls.conf")
    port, tls_port = free_port(), free_port()
    for conf in (root / "config/mosquitto.conf", *(root / "config/conf.d").glob("*.conf")):
        text = conf.read_text().replace("/mosquitto/certs/", f"{root}/tls-certs/").replace("/mosquitto/", f"{root}/")
        text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
        text = re.sub(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", text, flags=re.M)
        conf.write_text(text)
    # Started as root, Mosquitto would switch to user "mosquitto", who can't read the temp dir.
    conf = root / "config/mosquitto.conf"
    if os.geteuid() == 0:
        conf.write_text("user root\n" + conf.read_text())
    log = root / "log/mosquitto.log"
    proc = subprocess.Popen([need("mosquitto"), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", tls_port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                            f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield Mosquitto(port, tls_port, passwords, root / "certs/ca.crt", log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Client:
    """A paho client (API v2) that records its CONNACK and every message it receives."""

    def __init__(self, port: int, user: str | None, password: str | None, ca: Path | None = None):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack = threading.Event()
        self.reason: Any = None
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"emdc-test-{uuid.uuid4().hex[:8]}",
                                protocol=mqtt.MQTTv311)
        if user is not None:
            self.mqtt.username_pw_set(user, password)
        if ca is not None:
            self.mqtt.tls_set(ca_certs=str(ca))
            self.mqtt.tls_insecure_set(True)  # names are checked by test_tls_listener_certificate
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.mqtt.connect("127.0.0.1", port, keepalive=10)
        self.mqtt.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.reason = reason_code
        self.connack.set()

    @property
    def accepted(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.mqtt.on_subscribe = lambda *_args: done.set()
        self.mqtt.subscribe(topic, qos=1)
        assert done.wait(5)

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.mqtt.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def received_until(self, sentinel: str) -> list[tuple[str, bytes]]:
        """Messages up to the sentinel topic; QoS 1 from one publisher arrives in order."""
        got = []
        while True:
            topic, payload = self.messages.get(timeout=5)
            if topic == sentinel:
                return got
            got.append((topic, payload))

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@contextlib.contextmanager
def clients(broker: Mosquitto, *users: str, tls: bool = False) -> Iterator[list[Client]]:
    made = []
    try:
        for user in users:
            made.append(Client(broker.tls_port if tls else broker.port, user, broker.passwords[user],
                               broker.ca if tls else None))
        yield made
    finally:
        for c in made:
            c.close()


def test_mosquitto_refuses_anonymous_and_wrong_passwords(mosquitto_broker):
    anonymous = Client(mosquitto_broker.port, None, None)
    wrong = Client(mosquitto_broker.port, "emdc-writer", "not-the-password")
    unknown = Client(mosquitto_broker.port, "guest", "guest")
    try:
        assert not anonymous.accepted and not wrong.accepted and not unknown.accepted
    finally:
        for c in (anonymous, wrong, unknown):
            c.close()
    with clients(mosquitto_broker, "emdc-writer", "homeassistant") as (writer, ha):
        assert writer.accepted and ha.accepted


def test_mosquitto_acl_lets_the_writer_feed_home_assistant(mosquitto_broker):
    tag = uuid.uuid4().hex[:8]  # fresh topics: retained messages of other tests stay out of the way
    with clients(mosquitto_broker, "emdc-writer", "homeassistant") as (writer, ha):
        ha.subscribe(f"home/energy/{tag}/#")
        ha.subscribe(f"homeassistant/sensor/{tag}/#")
        writer.subscribe("homeassistant/status")
        writer.publish(f"homeassistant/sensor/{tag}/active_energy/config", "{}", retain=True)
        writer.publish(f"home/energy/{tag}/active_energy", "1.234", retain=True)
        writer.publish(f"home/energy/{tag}/status", "online", retain=True)
        writer.publish(f"home/energy/{tag}/sentinel", "")
        assert ha.received_until(f"home/energy/{tag}/sentinel") == [
            (f"homeassistant/sensor/{tag}/active_energy/config", b"{}"),
            (f"home/energy/{tag}/active_energy", b"1.234"),
            (f"home/energy/{tag}/status", b"online"),
        ]
        ha.publish("homeassistant/status", "online")  # Home Assistant's birth message
        assert writer.messages.get(timeout=5) == ("homeassistant/status", b"online")


def test_mosquitto_acl_drops_what_a_user_may_not_publish(mosquitto_broker):
    tag = uuid.uuid4().hex[:8]
    with clients(mosquitto_broker, "emdc-writer", "homeassistant", "emdc-test-observer") as (writer, ha, observer):
        for topic in (f"home/energy/{tag}/#", f"homeassistant/{tag}/#", f"other/{tag}/#", "homeassistant/status"):
            observer.subscribe(topic)
        ha.publish(f"home/energy/{tag}/active_energy", "999")  # HA may read states, not forge them
        ha.publish(f"homeassistant/{tag}/config", "{}")  # nor write discovery
        ha.publish("homeassistant/status", "online")
        assert observer.received_until("homeassistant/status") == []
        writer.publish(f"other/{tag}/topic", "x")  # the writer stays inside its topics
        writer.publish(f"home/energy/{tag}/sentinel", "")
        assert observer.received_until(f"home/energy/{tag}/sentinel") == []


def test_mosquitto_tls_listener_takes_the_same_users(mosquitto_broker):
    with clients(mosquitto_broker, "emdc-writer", tls=True) as (writer,):
        assert writer.accepted
    anonymous = Client(mosquitto_broker.tls_port, None, None, mosquitto_broker.ca)
    try:
        assert not anonymous.accepted
    finally:
        anonymous.close()


def test_tls_listener_certificate_names_the_service(mosquitto_broker):
    """The README recipe's certificate verifies against its CA under the compose service name."""
    context = ssl.create_default_context(cafile=str(mosquitto_broker.ca))
    # Python 3.13+ (Home Assistant) verifies strictly by default; the recipe's certificates must pass.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection(("127.0.0.1", mosquitto_broker.tls_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="mosquitto") as tls:
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    with socket.create_connection(("127.0.0.1", mosquitto_broker.tls_port), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname="not-the-broker.example.net")
