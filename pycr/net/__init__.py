"""pycr's network channel: one TCP connection between two pycr processes.

- `channel`: the wire format (formats/wire.py) over a socket: hello, framed and
  checksummed messages, a deadline on every read; refusals are NetError subclasses.
- `auth`: the secret file and the mutual HMAC challenge-response run right after the hello.
- `page_server` / `page_client`: criu's page server: a dump's pages files written
  into another machine's directory (`pycr page-server`, `pycr dump --page-server`).
- `tls`: `--tls`, mutual certificates around the whole connection (Python's ssl).
"""

# criu's default TLS files (criu/tls.c), for an option --tls is given without. Here, not in tls.py,
# so that the command's help names them without importing ssl.
CRIU_TLS_CERT = "/etc/pki/criu/cert.pem"
CRIU_TLS_KEY = "/etc/pki/criu/private/key.pem"
CRIU_TLS_CACERT = "/etc/pki/CA/cacert.pem"
CRIU_TLS_CACRL = "/etc/pki/CA/cacrl.pem"
