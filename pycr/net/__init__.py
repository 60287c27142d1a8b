"""pycr's network channel: one TCP connection between two pycr processes.

- `channel`: the wire format (formats/wire.py) over a socket: hello, framed and
  checksummed messages, a deadline on every read; refusals are NetError subclasses.
- `auth`: the secret file and the mutual HMAC challenge-response run right after the hello.
- `page_server` / `page_client`: criu's page server: a dump's pages files written
  into another machine's directory (`pycr page-server`, `pycr dump --page-server`).
"""
