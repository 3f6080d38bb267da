"""Drives `ee chat` on a pseudo-terminal, as a person at a keyboard would.

Usage: chat_pty.py EE BUNDLE SERVER_URL

Asks for a long story, types while it streams, presses Ctrl-C mid-answer,
recalls the question with the up arrow, clears it, asks another question,
and quits with Ctrl-D. Prints a JSON report of what the terminal showed.
"""
import json
import os
import pty
import select
import sys
import time

exe, bundle, server = sys.argv[1:4]
pid, fd = pty.fork()
if pid == 0:
    os.execv(exe, [exe, "chat", "--bundle", bundle, "--server", server,
                   "--max-tokens", "400", "--temperature", "0"])

screen = b""


def read_until(needle, timeout, start=0):
    """Reads the terminal until `needle` appears after offset `start`."""
    global screen
    deadline = time.time() + timeout
    while needle not in screen[start:]:
        left = deadline - time.time()
        if left <= 0:
            raise SystemExit(f"timed out waiting for {needle!r}; screen: {screen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise SystemExit(f"ee chat exited; screen: {screen[-2000:]!r}")
            screen += chunk
    return screen.index(needle, start) + len(needle)


def settle(seconds):
    """Reads whatever arrives for `seconds`."""
    global screen
    deadline = time.time() + seconds
    while (left := deadline - time.time()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                screen += os.read(fd, 4096)
            except OSError:
                return


at = read_until(b"> ", 60)
os.write(fd, b"Write a very long story about a dragon who learns to sing.\r")
at = read_until(b"sing.", 10, at)
# Wait until the answer streams, then type into it and stop it.
answer_start = at
while len(screen) - answer_start < 40:
    settle(0.05)
os.write(fd, b"typed-while-streaming")
settle(0.3)
os.write(fd, b"\x03")
stopped_at = read_until(b"[stopped]", 20, answer_start)
streamed = screen[answer_start:stopped_at]
at = read_until(b"> ", 10, stopped_at)
# Up arrow: the question comes back for editing; Ctrl-U clears it.
os.write(fd, b"\x1b[A")
recalled_at = read_until(b"dragon", 10, at)
os.write(fd, b"\x15")
settle(0.2)
os.write(fd, b"What is the capital of France?\r")
at = read_until(b"France?", 10, recalled_at)
end = read_until(b"> ", 60, at)
second = screen[at:end]
os.write(fd, b"\x04")
_, status = os.waitpid(pid, 0)
print(json.dumps({
    "streamed": streamed.decode("utf-8", "replace"),
    "second": second.decode("utf-8", "replace"),
    "exit": os.waitstatus_to_exitcode(status),
}))
