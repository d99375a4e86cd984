#!/usr/bin/env python3
"""Memory of an SMTP server while many clients are inside a large DATA.

Opens SESSIONS connections to HOST:PORT; each sends EHLO, MAIL, RCPT, DATA and then all but
the last MiB of a SIZE-octet message, and waits there. The server's proportional set size
(Pss, from /proc/<pid>/smaps_rollup, summed over the given process and, with --children,
all its children, so that shared pages of a multi-process server count once) is read before
and once everything sent has been taken; the messages are then completed (each must be
answered 250) and the figures printed as one line:

    LARGE_DATA sessions=N size=S before_kib=B during_kib=D per_session_kib=P accepted=A
"""

import argparse
import os
import socket
import sys
import time


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def total_kib(pid, with_children):
    pids = [pid]
    if with_children:
        todo = [pid]
        while todo:
            kids = children(todo.pop())
            pids += kids
            todo += kids
    return sum(pss_kib(p) for p in pids)


def settled(pid, with_children):
    last = total_kib(pid, with_children)
    same = 0
    for _ in range(400):
        time.sleep(0.05)
        now = total_kib(pid, with_children)
        same = same + 1 if abs(now - last) < 256 else 0
        if same >= 8:
            return now
        last = now
    return last


def reply(sock):
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[3:4] == b" ":
                return line.decode(errors="replace")


def command(sock, line):
    sock.sendall(line.encode() + b"\r\n")
    return reply(sock)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--children", action="store_true")
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--size", type=int, default=20 << 20)
    p.add_argument("--rcpt", default="b@bench.test")
    a = p.parse_args()
    host, port = a.target.rsplit(":", 1)
    line = b"z" * 76 + b"\r\n"
    body = b"Subject: large\r\n\r\n" + line * (a.size // len(line))
    wire = body + b".\r\n"
    cut = max(0, len(wire) - (1 << 20))
    before = settled(a.pid, a.children)
    socks = []
    for _ in range(a.sessions):
        s = socket.create_connection((host, int(port)), timeout=120)
        for step in (None, "EHLO bench.test", "MAIL FROM:<a@x.test>", f"RCPT TO:<{a.rcpt}>", "DATA"):
            r = reply(s) if step is None else command(s, step)
            if r[:1] not in "23":
                sys.exit(f"{a.target}: {step or 'greeting'}: {r}")
        s.sendall(wire[:cut])
        socks.append(s)
    during = settled(a.pid, a.children)
    accepted = 0
    for s in socks:
        s.sendall(wire[cut:])
    for s in socks:
        if reply(s).startswith("250"):
            accepted += 1
        s.close()
    per = (during - before) / max(1, a.sessions)
    print(
        f"LARGE_DATA sessions={a.sessions} size={a.size} before_kib={before} "
        f"during_kib={during} per_session_kib={per:.0f} accepted={accepted}"
    )


if __name__ == "__main__":
    main()
