"""`--tls`: mutual certificates around pycr's connections (pycr/net/tls.py).

A throwaway CA and certificates are made with the `openssl` command for each
test. Over two hosts (tests/netns.py) a pre-copy `pycr migrate --to` under
TLS moves a tree that counts on with its memory intact; a peer whose
certificate another CA signed, and TLS on one side only, are refused on both
sides in one line while the source goes on. On loopback, a page-server dump
of a process whose memory holds a random marker is relayed through a plain
TCP proxy that records every byte: under TLS the marker never crosses, without
it it does (the check can fail). Bad files are refused before anything is
touched; revoked, expired and misnamed certificates are refused by the peer.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import procutil
from netns import two_hosts  # noqa: F401 (fixture)
from pycrcmd import one_line_error, pycr
import test_migrate_modes as modes
from test_migrate_net import Serve, Tree, assert_destination_empty, migrate, secret
from test_page_server import secret_file, servers  # noqa: F401 (fixture)
from workload_prelude import WORKLOAD_PRELUDE

from pycr.formats.wire import FrameType, Role
from pycr.net import auth, channel as ch, tls

CA_CONFIG = """[ca]
default_ca = test_ca
[test_ca]
database = {d}/index.txt
new_certs_dir = {d}
certificate = {d}/ca.pem
private_key = {d}/ca.key
serial = {d}/serial
crlnumber = {d}/crlnumber
default_md = sha256
default_days = 2
default_crl_days = 2
policy = anything
copy_extensions = copy
unique_subject = no
[anything]
commonName = supplied
"""

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


class Pki:
    """A CA of its own in `directory`, issuing certificates (openssl ca) and revoking them."""

    def __init__(self, directory, name="pycr-test-ca"):
        if shutil.which("openssl") is None:
            pytest.skip("the openssl command is not installed")
        self.dir = directory
        directory.mkdir()
        (directory / "ca.cnf").write_text(CA_CONFIG.format(d=directory))
        (directory / "index.txt").touch()
        (directory / "serial").write_text("01\n")
        (directory / "crlnumber").write_text("01\n")
        self.ca = directory / "ca.pem"
        openssl("req", "-x509", *EC, "-keyout", directory / "ca.key", "-out", self.ca, "-days", "2",
                "-subj", f"/CN={name}")

    def issue(self, name, ip, start=None, end=None):
        """(certificate, key) for `name`, valid for the IP address ip; start/end: openssl's dates."""
        cert, key, csr = (self.dir / f"{name}.pem", self.dir / f"{name}.key", self.dir / f"{name}.csr")
        openssl("req", "-new", *EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
                "-addext", f"subjectAltName=IP:{ip}")
        dates = (["-startdate", start] if start else []) + (["-enddate", end] if end else [])
        openssl("ca", "-batch", "-config", self.dir / "ca.cnf", "-in", csr, "-out", cert, "-notext", *dates)
        key.chmod(0o600)
        return cert, key

    def revoke(self, cert):
        """The CA's revocation list, with cert revoked."""
        openssl("ca", "-config", self.dir / "ca.cnf", "-revoke", cert)
        crl = self.dir / "crl.pem"
        openssl("ca", "-config", self.dir / "ca.cnf", "-gencrl", "-out", crl)
        return crl


def tls_args(pair, ca, ca_option="--tls-cacert"):
    return ("--tls", "--tls-cert", pair[0], "--tls-key", pair[1], ca_option, ca)


# ---------------------------------------------------------------- two hosts

def test_pre_copy_migration_over_tls_counts_on(two_hosts, tmp_path):
    pki = Pki(tmp_path / "pki")
    key = secret(tmp_path)
    log = tmp_path / "serve.log"
    # serve with the issue's option names (no --tls: the files imply it), migrate with criu's
    cert, tls_key = pki.issue("destination", two_hosts.dst_addr)
    serve = Serve(two_hosts, tmp_path, key, "-v", "-o", log, "--tls-cert", cert, "--tls-key", tls_key,
                  "--tls-ca", pki.ca)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.02)
    before = tree.latest()
    m = migrate(two_hosts, tree, serve.address, key, *tls_args(pki.issue("source", two_hosts.src_addr), pki.ca))
    threading.Thread(target=tree.proc.wait, daemon=True).start()    # reaped as soon as it is killed
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    assert tree.proc.wait(timeout=10) == -signal.SIGKILL
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    after = tree.assert_counts_on(tree.mark())
    assert {idx: pid for idx, (pid, _, _) in after.items()} == {idx: pid for idx, (pid, _, _) in before.items()}
    narration = log.read_text()
    assert "TLSv1.3" in narration and "its certificate (commonName=source)" in narration, narration[-2000:]


def test_post_copy_over_tls_pages_come_inside_the_migrations_tls(two_hosts, tmp_path):
    """The replica runs at once and gets its pages on fault and pushed from the source, on the migration's
    own TLS connection, which serve's lazy-pages daemon took over at its fork: its fetcher reads chunks
    while other threads send on it (RESUMING, ALL_PLACED; serve's RUNNING)."""
    pki = Pki(tmp_path / "pki")
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, *tls_args(pki.issue("destination", two_hosts.dst_addr), pki.ca))
    tree = modes.Tree(two_hosts, tmp_path, nproc=2, mib=8, per_s=0.02)
    m = modes.migrate(two_hosts, tree, serve, key, "--mode", "post-copy",
                      *tls_args(pki.issue("source", two_hosts.src_addr), pki.ca))
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    lazy = modes.LAZY_LINE.search(out)
    assert lazy and int(lazy.group(8)) >= 2 * 8 << 20, out
    assert serve.result()[0] == 0
    tree.assert_counts_on(tree.mark())


def test_a_link_cut_after_the_switch_is_won_back_through_tls_and_the_challenge(two_hosts, tmp_path):
    """Post-copy under TLS, the link cut once the replica runs: the source's redial to serve's port goes
    through the TLS handshake (certificates checked both ways) and the challenge again before its
    LAZY_RESUME is taken, and the pages go on to the last. A peer that dials there meanwhile with a
    certificate of another CA is refused in one line."""
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other", "another-ca")
    key = secret(tmp_path)
    log = tmp_path / "serve.log"
    moving = modes.Moving(two_hosts, tmp_path, key, "post-copy", "100mbit", mib=8, per_s=0.02, env=modes.RECONNECT,
                          serve_args=("-v", "-o", log, *tls_args(pki.issue("destination", two_hosts.dst_addr),
                                                                 pki.ca)),
                          source_args=tls_args(pki.issue("source", two_hosts.src_addr), pki.ca))
    intruder = config(other.issue("intruder", two_hosts.src_addr), pki.ca)
    with pytest.raises(ch.AuthError, match="certificate"):
        with ch.Channel(two_hosts.connect(two_hosts.src_ns, two_hosts.dst_addr, moving.serve.port), "destination",
                        timeouts=(5, 5), tls=(intruder, False, two_hosts.dst_addr)) as chan:
            chan.hello(Role.MIGRATE_SOURCE, {Role.MIGRATE_DEST})
    moving.cut_for(3)
    _, _, narration = moving.assert_won_back(serve_log=log)
    assert narration.count("its certificate (commonName=source)") == 2, narration[-3000:]
    assert narration.count("authenticated (HMAC-SHA256 challenge-response both ways)") == 2, narration[-3000:]
    refused = [line for line in narration.splitlines() if "refused a connection on serve's port" in line]
    assert len(refused) == 1 and "its TLS certificate is refused: unable to get local issuer certificate" in \
        refused[0], narration[-3000:]


def test_a_certificate_of_another_ca_is_refused_and_the_source_goes_on(two_hosts, tmp_path):
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other", "another-ca")
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, *tls_args(pki.issue("destination", two_hosts.dst_addr), pki.ca))
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=1, per_s=0)
    # it trusts the right CA and holds the secret, but its own certificate is another CA's
    m = migrate(two_hosts, tree, serve.address, key, *tls_args(other.issue("intruder", two_hosts.src_addr), pki.ca))
    out, err = m.communicate(timeout=30)
    assert m.returncode == 1, out + err
    line = err.strip()
    assert "\n" not in line and "refused this side's TLS certificate: not signed by the CA it trusts" in line, err
    status, _, serve_err = serve.result()
    assert status == 1, serve_err
    assert "its TLS certificate is refused: unable to get local issuer certificate (not signed by the CA of " \
           "--tls-cacert)" in serve_err, serve_err
    tree.assert_unharmed()
    assert_destination_empty(serve)


def test_tls_on_one_side_only_is_refused_on_both(two_hosts, tmp_path):
    pki = Pki(tmp_path / "pki")
    key = secret(tmp_path)
    dst = tls_args(pki.issue("destination", two_hosts.dst_addr), pki.ca)
    src = tls_args(pki.issue("source", two_hosts.src_addr), pki.ca)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=1, per_s=0)
    cases = [(dst, (), "takes only TLS connections (it runs with --tls)", "connected without TLS"),
             ((), src, "answered in clear, not with TLS: it runs without --tls",
              "speaks TLS (it runs with --tls), this side does not")]
    for serve_tls, source_tls, source_says, serve_says in cases:
        serve = Serve(two_hosts, tmp_path, key, *serve_tls)
        started = time.monotonic()
        m = migrate(two_hosts, tree, serve.address, key, *source_tls)
        out, err = m.communicate(timeout=30)
        assert m.returncode == 1 and time.monotonic() - started < 10, out + err
        assert "\n" not in err.strip() and source_says in err and "Traceback" not in err, err
        status, _, serve_err = serve.result()
        assert status == 1 and serve_says in serve_err and "Traceback" not in serve_err, serve_err
        tree.assert_unharmed()
        assert_destination_empty(serve)


# ---------------------------------------------------------------- the bytes on the wire

MARKED = WORKLOAD_PRELUDE + r"""
marker = bytes.fromhex("MARKER")
data = bytearray(marker * 65536)
report("ready %d" % os.getpid())
while True:
    time.sleep(0.05)
"""


class Recorder:
    """A plain TCP relay on loopback that keeps a copy of every byte it passes on, both ways."""

    def __init__(self, port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self.thread.start()

    def _run(self, port):
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", port))
        pumps = [threading.Thread(target=self._pump, args=(a, b)) for a, b in ((client, server), (server, client))]
        for t in pumps:
            t.start()
        for t in pumps:
            t.join()
        client.close()
        server.close()
        self.listener.close()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            with self.lock:
                self.seen += data
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_pages_cross_the_wire_encrypted(spawn_python, tmp_path, servers):  # noqa: F811 (fixture)
    pki = Pki(tmp_path / "pki")
    marker = os.urandom(16)
    w = spawn_python("marked", MARKED.replace("MARKER", marker.hex()))
    key = secret_file(tmp_path)
    server_tls = tls_args(pki.issue("page-server", "127.0.0.1"), pki.ca)
    client_tls = tls_args(pki.issue("dump", "127.0.0.1"), pki.ca)
    for name, server_args, client_args in (("plain", (), ()), ("tls", server_tls, client_tls)):
        server = servers(tmp_path / f"server-{name}", key, *server_args)
        relay = Recorder(server.port)
        pycr("dump", "-t", w.pid, "-D", tmp_path / f"img-{name}", "-R", "--page-server", "--address", "127.0.0.1",
             "--port", relay.port, "--secret-file", key, *client_args)
        assert server.finish()[0] == 0
        relay.thread.join(10)
        pages = (tmp_path / f"server-{name}" / f"pages-{w.pid}.img").read_bytes()
        assert pages.count(marker) >= 65536, "the page server got the marked memory"
        on_wire = bytes(relay.seen).count(marker)
        if name == "plain":
            assert on_wire >= 65536, "the relay sees the pages in clear without TLS"
        else:
            assert on_wire == 0 and len(relay.seen) > len(marker) * 65536, "under TLS the marker never crossed"
    procutil.assert_running_untraced(w.pid)


# ---------------------------------------------------------------- bad files, refused before anything

@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


def bad_cases(pki, tmp_path):
    good_cert, good_key = pki.issue("good", "127.0.0.1")
    other_cert, other_key = pki.issue("other", "127.0.0.1")
    expired = pki.issue("expired", "127.0.0.1", start="20200101000000Z", end="20200102000000Z")
    loose = tmp_path / "loose.key"
    shutil.copy(good_key, loose)
    loose.chmod(0o644)
    locked = tmp_path / "locked.key"
    openssl("pkey", "-in", good_key, "-aes256", "-passout", "pass:x", "-out", locked)
    locked.chmod(0o600)
    return [
        ((good_cert, locked, pki.ca), "locked.key: the TLS key is encrypted with a passphrase (--tls-key)"),
        ((tmp_path / "missing.pem", good_key, pki.ca), "missing.pem: cannot read the TLS certificate (--tls-cert): "
                                                       "No such file or directory"),
        ((good_cert, other_key, pki.ca), f"{other_key}: the TLS key does not match the certificate {good_cert}"),
        ((expired[0], expired[1], pki.ca), "expired.pem: the TLS certificate expired on Jan  2 00:00:00 2020 GMT"),
        ((good_cert, loose, pki.ca), "loose.key: the TLS key is accessible by group or others (mode 0644"),
        ((good_cert, good_key, good_key), "good.key: not a PEM CA certificate (--tls-cacert)"),
        ((other_key, other_key, pki.ca), "not a PEM certificate and its private key (--tls-cert, --tls-key)"),
    ]


def test_bad_tls_files_are_refused_in_one_line_and_the_tree_goes_on(spawn_python, tmp_path, pki):
    w = spawn_python("marked", MARKED.replace("MARKER", "00"))
    key = secret_file(tmp_path)
    for (cert, tls_key, ca), why in bad_cases(pki, tmp_path):
        got = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--page-server", "--address", "127.0.0.1",
                   "--port", 9, "--secret-file", key, "--tls-cert", cert, "--tls-key", tls_key, "--tls-cacert", ca,
                   expect=1)
        assert why in one_line_error(got)
        procutil.assert_running_untraced(w.pid)
    assert not (tmp_path / "img").exists()
    # page-server refuses at once too, and makes no directory
    got = pycr("page-server", "-D", tmp_path / "srv", "--port", 0, "--secret-file", key, "--tls", "--tls-cert",
               tmp_path / "missing.pem", "--tls-key", pki.dir / "good.key", "--tls-cacert", pki.ca, expect=1)
    assert "cannot read the TLS certificate" in one_line_error(got) and not (tmp_path / "srv").exists()
    # a TLS option where nothing connects is a usage mistake
    got = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--tls", expect=2)
    assert "--tls is for --page-server, which was not given" in got.stderr


# ---------------------------------------------------------------- the peer's certificate (in process)

def exchange(server_tls, client_tls, host="127.0.0.1", secret=b"s3cret"):
    """A page-server-like listener and a client over loopback, each with its TLS settings: hello,
    authentication, then 64 frames each way at once from two threads of the client (as the
    lazy-pages fetcher reads while another thread sends). -> (client outcome, server outcome)."""
    listener = ch.listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    out = {}

    def serve():
        chan = auth.accept(listener, auth.Credentials(secret, server_tls))
        try:
            chan.hello(Role.PAGE_SERVER, {Role.PAGE_CLIENT})
            auth.server_handshake(chan, secret)
            for i in range(64):
                chan.send(FrameType.DATA, bytes([i]) * 70000)
            got = [bytes(chan.recv(FrameType.DATA).body) for _ in range(64)]
            assert got == [bytes([255 - i]) * 50000 for i in range(64)]
            chan.send(FrameType.DONE)
            out["server"] = None
        except ch.NetError as exc:
            out["server"] = str(exc)
        finally:
            chan.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        chan = auth.connect(host, port, "page server", Role.PAGE_CLIENT, {Role.PAGE_SERVER},
                            auth.Credentials(secret, client_tls))
        with chan:
            sender = threading.Thread(target=lambda: [chan.send(FrameType.DATA, bytes([255 - i]) * 50000)
                                                      for i in range(64)])
            sender.start()
            got = [bytes(chan.recv(FrameType.DATA).body) for _ in range(64)]
            sender.join()
            assert got == [bytes([i]) * 70000 for i in range(64)]
            chan.recv(FrameType.DONE)
        out["client"] = None
    except ch.NetError as exc:
        out["client"] = str(exc)
    thread.join(10)
    listener.close()
    return out["client"], out["server"]


def config(pair, ca, crl=None, verify_name=True):
    return tls.TlsConfig(str(pair[0]), str(pair[1]), str(ca), None if crl is None else str(crl), verify_name)


def test_both_ways_at_once_under_tls_and_the_refusals_of_a_peer(pki):
    server = config(pki.issue("server", "127.0.0.1"), pki.ca)
    client = pki.issue("client", "127.0.0.1")
    assert exchange(server, config(client, pki.ca)) == (None, None)

    # a revoked client certificate, with the CA's revocation list on the listener
    crl = pki.revoke(client[0])
    c, s = exchange(config(pki.issue("server2", "127.0.0.1"), pki.ca, crl), config(client, pki.ca))
    assert "its TLS certificate is refused: certificate revoked" in s
    assert "refused this side's TLS certificate" in c or "did it refuse this side's certificate" in c, c

    # a listener whose certificate names another address: refused by name, unless --tls-no-cn-verify
    elsewhere = config(pki.issue("elsewhere", "192.0.2.1"), pki.ca)
    fresh = pki.issue("client2", "127.0.0.1")
    c, s = exchange(elsewhere, config(fresh, pki.ca))
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'. (--tls-no-cn-verify skips" in c, c
    assert "refused this side's TLS certificate" in s, s
    assert exchange(elsewhere, config(fresh, pki.ca, verify_name=False)) == (None, None)


def test_a_certificate_that_expired_since_it_was_loaded_is_refused_by_the_peer(pki):
    end = int(time.time()) + 2
    client = config(pki.issue("brief", "127.0.0.1", end=time.strftime("%Y%m%d%H%M%SZ", time.gmtime(end))),
                    pki.ca)                         # valid now: it loads
    server = config(pki.issue("server", "127.0.0.1"), pki.ca)
    time.sleep(max(0.0, end + 1.2 - time.time()))
    c, s = exchange(server, client)
    assert "its TLS certificate is refused: certificate has expired" in s, s
    assert "refused this side's TLS certificate: expired" in c, c
