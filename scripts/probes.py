#!/usr/bin/env python3
"""Probes of a release broker, for the figures in docs/RELIABILITY.md.

    scripts/probes.py stall BINARY N [BENCH_ARGS...]   # probe waits under a deep backlog
    scripts/probes.py memory BINARY [PAYLOAD]          # RSS per ready / in-flight message
    scripts/probes.py queues BINARY                    # RSS per queue of one message

`stall`: while `ferry bench -c 0` pipelines N small publishes into one queue, a probe
connection publishes one message every 20 ms to another queue and times each confirm;
prints the probe waits per backlog band of a million. Extra arguments go to the bench
(e.g. `--rate 1000000`).

`memory`: RSS growth over a million publishes of PAYLOAD (default empty), then with
8 x 65,535 of them in flight to consumers that read but never ack.

`queues`: RSS growth over 50,000 queues holding one empty message each.

The broker each probe starts listens on 127.0.0.1, port 0.
"""

import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time


def frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def read_frames(sock, n):
    """The next n frame bodies from sock."""
    buf, got = b"", []
    while len(got) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("the broker closed the connection")
        buf += chunk
        while len(buf) >= 4:
            (length,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + length:
                break
            got.append(buf[4 : 4 + length])
            buf = buf[4 + length :]
    return got


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_broker(binary, *args):
    """Starts `BINARY broker` and returns (process, (host, port))."""
    broker = subprocess.Popen(
        [binary, "broker", "--addr", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in broker.stderr:
        found = re.search(r"listening on (\S+)", line)
        if found:
            # Keep draining its log so that it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in broker.stderr], daemon=True).start()
            host, port = found.group(1).rsplit(":", 1)
            return broker, (host, int(port))
    raise RuntimeError("the broker never said `listening on`")


def register(addr, role, queue, **fields):
    sock = socket.create_connection(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(frame({"type": "register", "role": role, "queue": queue, **fields}))
    return sock


def publish(addr, queue, n, payload):
    """Publishes n messages in pipelined batches of 1,000; fails on any refusal."""
    sock = register(addr, "producer", queue)
    read_frames(sock, 1)
    batch = frame({"type": "publish", "payload": payload})
    sent = 0
    while sent < n:
        k = min(1000, n - sent)
        sock.sendall(batch * k)
        refused = [r for r in read_frames(sock, k) if b'"ok"' not in r]
        if refused:
            raise RuntimeError(f"refused after {sent}: {refused[0]!r}")
        sent += k
    sock.close()


def settled_rss(pid):
    """RSS once the broker has had a moment to finish what it was handed."""
    time.sleep(0.3)
    return rss(pid)


def stall(binary, n, bench_args):
    broker, addr = start_broker(binary, "--max-memory", "8GiB")
    probe = register(addr, "producer", "probe")
    read_frames(probe, 1)
    flood = subprocess.Popen(
        [binary, "bench", "--addr", f"{addr[0]}:{addr[1]}", "-c", "0", "-m", str(n),
         "-s", "30", "-w", "5000", *bench_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    waits = {}
    while flood.poll() is None:
        started = time.perf_counter()
        probe.sendall(frame({"type": "publish", "payload": "p"}))
        reply = json.loads(read_frames(probe, 1)[0])
        waits.setdefault(reply["id"] // 1_000_000, []).append(
            (time.perf_counter() - started) * 1000
        )
        time.sleep(0.02)
    for band in sorted(waits):
        w = sorted(waits[band])
        print(f"backlog {band}M-{band + 1}M: {len(w)} probes, median {w[len(w) // 2]:.1f} ms, "
              f"p90 {w[int(len(w) * 0.9)]:.1f} ms, longest {w[-1]:.1f} ms")
    print(f"overall longest: {max(max(w) for w in waits.values()):.1f} ms")
    broker.kill()


def memory(binary, payload):
    broker, addr = start_broker(binary, "--ack-timeout", "1h", "--max-memory", "20GiB")
    base = settled_rss(broker.pid)
    n = 1_000_000
    publish(addr, "ready", n, payload)
    ready = settled_rss(broker.pid)
    print(f"ready: {(ready - base) / n:.1f} bytes/message "
          f"(payload literal {len(json.dumps(payload))} bytes)")
    consumers, moved = [], 0
    for _ in range(8):
        consumer = register(addr, "consumer", "ready", prefetch=65535)
        read_frames(consumer, 1 + 65535)
        consumers.append(consumer)
        moved += 65535
    in_flight = settled_rss(broker.pid)
    print(f"in flight: {(in_flight - ready) / moved:+.1f} bytes/message beyond ready "
          f"({moved} moved in flight)")
    broker.kill()


def queues(binary):
    broker, addr = start_broker(binary, "--max-memory", "20GiB")
    base = settled_rss(broker.pid)
    n = 50_000
    for i in range(n):
        publish(addr, f"queue-{i:06d}", 1, "")
    print(f"{(settled_rss(broker.pid) - base) / n:.0f} bytes per queue with one message")
    broker.kill()


def main(argv):
    if len(argv) >= 4 and argv[1] == "stall":
        stall(argv[2], int(argv[3]), argv[4:])
    elif len(argv) in (3, 4) and argv[1] == "memory":
        memory(argv[2], argv[3] if len(argv) == 4 else "")
    elif len(argv) == 3 and argv[1] == "queues":
        queues(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
