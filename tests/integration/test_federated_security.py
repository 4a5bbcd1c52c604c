"""`--tls` and `--auth` end to end (docs/federated.md, Security), with real processes.

Certificates and SuperNode keys are made by the shell commands of the docs' Security section
(read from docs/federated.md, with the SuperLink's name and IP set to localhost/127.0.0.1).
One SuperLink (`flywheel fed superlink --tls --auth`), two keys registered with
`flywheel fed register`, and four sites started with `flywheel fed client`:

* `good`: `--tls --auth`, a registered key: it joins, and one round of
  `flywheel fed server --tls` completes with it;
* `rogue`: `--tls --auth`, a key that was never registered: the SuperLink refuses to activate
  it (HTTP 412, "No SuperNode found with the given public key") and the site exits;
* `wrongca`: `--tls --auth`, a registered key, but another CA than the SuperLink's: the TLS
  handshake fails (CERTIFICATE_VERIFY_FAILED) and the site exits;
* `plain`: no `--tls` (allowed on loopback, and its log says INSECURE): plain HTTP to the HTTPS
  port never gets an answer; Flower retries for ever and the site never gets a node id.

The round is asked for 4 sites (at least 1): only the good one is sampled and replies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flywheel.learner.federated.demo import build_homes
from flywheel.learner.federated.partition import make_partition
from flywheel.learner.federated.processes import (
    BIN,
    free_port,
    process_env,
    stop_process,
    wait_for_port,
)
from flywheel.learner.seed_model import ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from tests.deadlines import deadline

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "federated.md"
FLYWHEEL = str(BIN / "flywheel")
SITES = ("good", "rogue", "wrongca", "plain")


def _require_tools() -> None:
    missing = [t for t in ("openssl", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        msg = f"{' and '.join(missing)} not installed (docs/federated.md's commands need it)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg)
        pytest.skip(msg)


def documented_commands() -> list[str]:
    """The key- and certificate-making commands (openssl, printf, ssh-keygen) of the
    Security section's ```sh blocks, continuation lines joined, in order."""
    section = DOCS.read_text().split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.split(" ", 1)[0] in ("openssl", "printf", "ssh-keygen"):
                commands.append(" ".join(line.split()))
    return commands


def _sh(script: str, cwd: Path) -> None:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{script}\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, superlink.pem/.key (SAN localhost, 127.0.0.1), another CA (other.pem), and
    SuperNode keys site1, site2 (to be registered) and rogue (never registered)."""
    _require_tools()
    commands = documented_commands()
    certs = [c for c in commands if not c.startswith("ssh-keygen")]
    (keygen,) = [c for c in commands if c.startswith("ssh-keygen")]
    assert sum(c.startswith("openssl") for c in certs) == 3, commands
    assert "site1" in keygen, keygen
    d = tmp_path_factory.mktemp("pki")
    script = [
        c.replace("superlink.example.com", "localhost").replace("10.0.0.5", "127.0.0.1")
        for c in certs
    ]
    script.append(
        certs[0]
        .replace("ca.key", "other.key")
        .replace("ca.pem", "other.pem")
        .replace("flywheel-ca", "not-the-platform-ca")
    )
    script += [keygen.replace("site1", name) for name in ("site1", "site2", "rogue")]
    _sh("\n".join(script), d)
    for f in (
        "ca.pem",
        "superlink.pem",
        "superlink.key",
        "other.pem",
        "site1",
        "site1.pub",
        "site2.pub",
        "rogue.pub",
    ):
        assert (d / f).is_file(), f
    return d


class Federation:
    def __init__(self, root: Path) -> None:
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.settings: dict[str, Settings] = {}  # each process's settings

    def spawn(self, name: str, args: list[str], settings: Settings) -> subprocess.Popen:
        self.settings[name] = settings
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [FLYWHEEL, "fed", *args],
                env=process_env(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def tails(self, *names: str) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-2500:]}" for n in names)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name])


def _one_round(federation: Federation, platform: Settings) -> dict:
    """One unpublished TLS round asking for 4 sites: the run's summary."""
    done = subprocess.run(
        [
            FLYWHEEL,
            "fed",
            "server",
            "--tls",
            "--rounds",
            "1",
            "--clients",
            "4",
            "--no-publish",
            "--json",
            "--timeout",
            "120",
        ],
        env=process_env(platform),
        capture_output=True,
        text=True,
        timeout=deadline(180),
    )
    assert done.returncode == 0, done.stderr[-3000:] + federation.tails("superlink", "good")
    return json.loads(done.stdout)


def _register(key: Path, platform: Settings) -> subprocess.Popen:
    return subprocess.Popen(
        [FLYWHEEL, "fed", "register", str(key)],
        env=process_env(platform),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory, pki):
    """Everything up to and including one TLS + auth round; yields (federation, node ids of
    the registered keys, the run's summary, the exit codes of the sites that exited)."""
    root = tmp_path_factory.mktemp("fedsec")
    platform, sites = build_homes(
        root,
        len(SITES),
        make_partition(len(SITES), alpha=0.5),
        rounds=2,  # each site budgets its sources for 2 rounds: the restart test's too
        fed_tls_ca=pki / "ca.pem",
        fed_min_clients=1,
    )
    platform = platform.model_copy(
        update={"fed_tls_cert": pki / "superlink.pem", "fed_tls_key": pki / "superlink.key"}
    )
    site = dict(zip(SITES, sites, strict=True))
    site["good"] = site["good"].model_copy(update={"fed_auth_key": pki / "site1"})
    site["rogue"] = site["rogue"].model_copy(update={"fed_auth_key": pki / "rogue"})
    site["wrongca"] = site["wrongca"].model_copy(
        update={"fed_auth_key": pki / "site2", "fed_tls_ca": pki / "other.pem"}
    )
    site["plain"] = site["plain"].model_copy(update={"fed_tls_ca": None})
    ensure_champion(platform.trusted, Registry.of(platform))
    federation = Federation(root)
    try:
        link = federation.spawn("superlink", ["superlink", "--tls", "--auth"], platform)
        wait_for_port(platform.fed_superlink, deadline(60), link)
        registered = {}
        for key, proc in [(k, _register(pki / f"{k}.pub", platform)) for k in ("site1", "site2")]:
            out, _ = proc.communicate(timeout=deadline(60))
            assert proc.returncode == 0, out
            registered[key] = int(re.search(r"SuperNode (\d+) registered", out).group(1))
        for name in SITES:
            flags = [] if name == "plain" else ["--tls", "--auth"]
            federation.spawn(
                name, ["client", *flags, "--node-config", f'site="{name}"'], site[name]
            )
        # the refused sites exit; the good one gets its node id
        until = time.monotonic() + deadline(90)
        while (
            federation.procs["rogue"].poll() is None
            or federation.procs["wrongca"].poll() is None
            or "SuperNode ID:" not in federation.log("good")
        ):
            assert time.monotonic() < until, federation.tails(*SITES)
            assert federation.procs["good"].poll() is None, federation.tails("good")
            time.sleep(0.3)
        exits = {n: federation.procs[n].returncode for n in ("rogue", "wrongca")}
        yield federation, registered, _one_round(federation, platform), exits
    finally:
        federation.stop()


def test_tls_auth_round_completes_with_the_registered_site(fed):
    federation, registered, summary, _ = fed
    (round1,) = summary["rounds"]
    assert round1["sites"] == [registered["site1"]], round1  # asked for 4, 1 could join
    assert round1["replied"] == 1 and round1["examples"] > 0, round1
    link = federation.log("superlink")
    assert "Uvicorn running on https://" in link and "INSECURE" not in link
    assert "[Fleet.ActivateNode] Activated node_id=" + str(registered["site1"]) in link
    assert "INSECURE" not in federation.log("good")


def test_a_site_with_an_unregistered_key_is_refused(fed, pki):
    from cryptography.hazmat.primitives import serialization

    federation, _, summary, exits = fed
    assert exits["rogue"] == 1, federation.tails("rogue")  # `fed client` exits 1
    assert "Failed to activate SuperNode" in federation.log("rogue")
    assert "SuperNode ID:" not in federation.log("rogue")
    # the SuperLink refused exactly this key
    pem = (
        serialization.load_ssh_public_key((pki / "rogue.pub").read_bytes())
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    refusals = [
        line
        for line in federation.log("superlink").splitlines()
        if "No SuperNode found with the given public key" in line
    ]
    assert any(pem.splitlines()[1] in line for line in refusals), refusals
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in federation.log("superlink")
    assert all(r["sites"] == summary["rounds"][0]["sites"] for r in summary["rounds"])


def test_a_site_without_the_platforms_ca_or_without_tls_cannot_connect(fed):
    federation, _, _, exits = fed
    wrong = federation.log("wrongca")
    assert exits["wrongca"] == 1, federation.tails("wrongca")
    assert "CERTIFICATE_VERIFY_FAILED" in wrong and "SuperNode ID:" not in wrong
    plain = federation.log("plain")
    assert "INSECURE" in plain and "allowed on loopback" in plain  # it says so in its log
    assert "Starting Flower SuperNode" in plain and "Connection attempt failed" in plain, plain[
        -2000:
    ]
    assert "SuperNode ID:" not in plain and federation.procs["plain"].poll() is None
    # one node was ever activated: the good site's
    assert federation.log("superlink").count("[Fleet.ActivateNode] Activated") == 1


def test_documented_certificates_pass_strict_verification(pki):
    """Python 3.13 verifies with VERIFY_X509_STRICT by default (a CA without keyUsage fails)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki / "superlink.pem", pki / "superlink.key")
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    server.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    conn.close()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        for name in ("127.0.0.1", "localhost"):
            with client.wrap_socket(
                socket.create_connection(("127.0.0.1", port)), server_hostname=name
            ) as tls:
                assert tls.version()
        thread.join(5)


def test_plaintext_off_loopback_is_refused_by_every_fed_command(tmp_path, pki, monkeypatch):
    """The CLI, not just the command builders (unit-tested): exit 2 before anything starts."""
    from typer.testing import CliRunner

    from flywheel.cli import app, register_commands

    register_commands()
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_FED_SUPERLINK", "10.0.0.5:9093")
    for args in (
        ["superlink"],
        ["client"],
        ["server", "--rounds", "1"],
        ["register", "--no-tls", str(pki / "site1.pub")],
    ):
        result = CliRunner().invoke(app, ["fed", *args])
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert "loopback" in result.output, (args, result.output)


def test_clientapp_worker_ends_when_its_supernode_is_gone():
    """A refused SuperNode exits; `fed client` then stops its worker, which must not sit in
    Flower's endless HTTP retry (it did: the refused sites above never exited)."""
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SubStatus

    from flywheel.learner.federated.worker import run_task, serve

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    stop = threading.Event()
    worker = threading.Thread(
        target=serve,
        args=(address, ClientApp()),
        kwargs={"poll_s": 0.05, "stop": stop},
        daemon=True,
    )
    worker.start()
    time.sleep(0.5)
    stop.set()
    worker.join(5)
    assert not worker.is_alive()
    started = time.monotonic()  # a task whose SuperNode is gone ends, undelivered
    assert run_task(address, "token", ClientApp(), stop) == SubStatus.FAILED
    assert time.monotonic() - started < 5


def test_a_restarted_site_continues_its_budget_under_its_registered_key(fed):
    """Flower binds a node id to the key `fed register` registered and gives it back when
    the key reconnects: the ledger's `site:<id>` source goes on, no fresh budget (without
    auth a restarted SuperNode drew a new id: 5 ledger sources for 4 sites)."""
    from flywheel.privacy import PrivacyLedger
    from flywheel.store import open_store

    federation, registered, _, _ = fed
    site = f"site:{registered['site1']}"
    platform = federation.settings["superlink"]
    lineage = f"{platform.model_name}:federated"
    engine = open_store(platform.resolved_database_url)
    try:
        ledger = PrivacyLedger(engine)
        before = {s.source: s for s in ledger.sources(lineage)}
        assert list(before) == [site], before  # the first round, under the site's key
        stop_process(federation.procs["good"])
        # the SuperLink takes the key again once it has marked the old connection offline
        # (Flower: 2 heartbeat intervals, 60 s by default); until then `fed client` exits 1
        # ("Failed to activate SuperNode") and the site, like an operator, starts it again
        until = time.monotonic() + deadline(180)
        joined = federation.log("good").count("SuperNode ID:")
        refused = federation.log("good").count("Failed to activate SuperNode")

        def restart() -> subprocess.Popen:
            return federation.spawn(
                "good",
                ["client", "--tls", "--auth", "--node-config", 'site="good"'],
                federation.settings["good"],
            )

        proc = restart()
        while federation.log("good").count("SuperNode ID:") == joined:
            assert time.monotonic() < until, federation.tails("good", "superlink")
            if proc.poll() is not None:
                now_refused = federation.log("good").count("Failed to activate SuperNode")
                assert now_refused > refused, federation.tails("good")
                refused = now_refused
                proc = restart()
            time.sleep(1.0)
        summary = _one_round(federation, platform)
        assert summary["rounds"], summary
        assert summary["rounds"][0]["sites"] == [registered["site1"]], summary
        after = {s.source: s for s in ledger.sources(lineage)}
        assert list(after) == [site], after  # the same source, not a new one
        assert after[site].updates == before[site].updates + 1
        assert after[site].epsilon > before[site].epsilon  # the budget went on
    finally:
        engine.dispose()
