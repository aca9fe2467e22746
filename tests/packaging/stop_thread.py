#!/usr/bin/env python3
"""Stop ONE thread of a running process from outside, the rest running on:
the package test's stuck worker. ptrace stops a single thread (a signal such
as SIGSTOP would stop the whole process): PTRACE_SEIZE attaches to that
thread only, PTRACE_INTERRUPT stops it.

  stop_thread.py CONTAINER_INIT_PID PID THREAD_NAME READY_FILE

PID is the process as the container sees it (systemctl show -p MainPID);
CONTAINER_INIT_PID is the container's systemd as the host sees it. The
helper runs on the host (as root) and finds the host's view of PID: the
process in the container's PID namespace whose innermost NSpid is PID. It
stops the thread whose name (/proc/…/task/*/comm) is THREAD_NAME, writes
"HOST_PID TID" to READY_FILE, then keeps the thread stopped until the
process goes (the watchdog kills it; the helper reaps the traced thread so
the process can be reaped by systemd) or until SIGTERM (detach: the thread
runs again). Exits 0 then, 1 on any failure. Standard library only."""
import ctypes, errno, os, signal, sys, time

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_CONT = 7
PTRACE_DETACH = 17
WALL = 0x40000000  # __WALL: wait for a thread that is not our child
PTRACE_EVENT_STOP = 128
POLL_S = 0.1
# Longest the helper keeps a thread stopped: the test's deadlines are far
# shorter; this only bounds a helper nobody stopped.
MAX_STOPPED_S = 300

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def ptrace(request, tid, data=0):
    if libc.ptrace(request, tid, None, ctypes.c_void_p(data)) == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace({request:#x}, {tid}): {os.strerror(e)}")


def host_pid(init_pid, pid):
    namespace = os.readlink(f"/proc/{init_pid}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/status") as f:
                nspid = next(l.split()[1:] for l in f if l.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid and nspid[-1] == str(pid):
            return int(entry)
    raise SystemExit(f"stop_thread: no process {pid} in the PID namespace of {init_pid}")


def thread_named(pid, name):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return int(tid)
        except OSError:
            continue
    raise SystemExit(f"stop_thread: process {pid} has no thread named {name}")


def thread_state(tid):
    with open(f"/proc/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def main():
    init_pid, pid, name, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    hpid = host_pid(init_pid, pid)
    tid = thread_named(hpid, name)
    detach = []
    signal.signal(signal.SIGTERM, lambda *_: detach.append(True))
    ptrace(PTRACE_SEIZE, tid)
    ptrace(PTRACE_INTERRUPT, tid)
    _, status = os.waitpid(tid, WALL)
    if not os.WIFSTOPPED(status) or thread_state(tid) != "t":
        raise SystemExit(f"stop_thread: thread {tid} did not stop (status {status:#x})")
    others = [t for t in os.listdir(f"/proc/{hpid}/task") if int(t) != tid]
    with open(ready + ".tmp", "w") as f:
        f.write(f"{hpid} {tid}\n")
    os.rename(ready + ".tmp", ready)
    print(f"stopped thread {tid} ({name}) of {hpid}; {len(others)} other threads run on", flush=True)
    end = time.monotonic() + MAX_STOPPED_S
    while not detach and time.monotonic() < end:
        try:
            got, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            print("the thread is gone", flush=True)
            return 0
        if got == tid:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                print("the thread exited", flush=True)
                return 0
            sig = os.WSTOPSIG(status)
            if os.WIFSTOPPED(status) and (status >> 16) != PTRACE_EVENT_STOP and sig != signal.SIGTRAP:
                # A signal for this thread (e.g. the watchdog's SIGABRT):
                # deliver it, as if nobody were tracing.
                ptrace(PTRACE_CONT, tid, sig)
        time.sleep(POLL_S)
    try:
        ptrace(PTRACE_DETACH, tid)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
    print("detached", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
