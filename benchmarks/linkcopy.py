"""Copy an image directory from one host to the other over TCP, so that its bytes cross the link.

    python -m benchmarks.linkcopy recv ADDR PORT DIR     # destination: listen, untar into DIR
    python -m benchmarks.linkcopy send ADDR PORT DIR     # source: tar DIR (holes stay holes)
    python -m benchmarks.linkcopy send ADDR PORT --bytes N   # N zero bytes (a raw link check)
    python -m benchmarks.linkcopy recv ADDR PORT -       # discard what comes

recv prints "listening" once its socket accepts, then "received BYTES SECONDS" at the end.
GNU tar does the files (-S: sparse files keep their holes, as `cp --sparse` would).
"""

import socket
import subprocess
import sys
import time

CHUNK = 1 << 20


def recv(addr, port, target):
    srv = socket.create_server((addr, int(port)))
    print("listening", flush=True)
    conn, _ = srv.accept()
    srv.close()
    sink = None if target == "-" else subprocess.Popen(["tar", "-C", target, "-xSf", "-"], stdin=subprocess.PIPE)
    total, t0 = 0, time.monotonic()
    while data := conn.recv(CHUNK):
        total += len(data)
        if sink:
            sink.stdin.write(data)
    if sink:
        sink.stdin.close()
        if sink.wait():
            raise SystemExit(f"tar -x into {target} failed")
    print(f"received {total} {time.monotonic() - t0:.6f}", flush=True)


def send(addr, port, what, count=None):
    conn = socket.create_connection((addr, int(port)))
    if what == "--bytes":
        zeros, left = bytes(CHUNK), int(count)
        while left > 0:
            conn.sendall(zeros[:min(left, CHUNK)])
            left -= CHUNK
    else:
        tar = subprocess.Popen(["tar", "-C", what, "-cSf", "-", "."], stdout=subprocess.PIPE)
        while data := tar.stdout.read(CHUNK):
            conn.sendall(data)
        if tar.wait():
            raise SystemExit(f"tar -c of {what} failed")
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)        # the receiver closes once it has everything
    conn.close()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"recv": recv, "send": send}[mode](*args)
