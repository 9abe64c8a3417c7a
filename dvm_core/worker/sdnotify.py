"""systemd's sd_notify protocol, by hand (no package): readiness, status, watchdog, stopping.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET`, an AF_UNIX datagram socket (a path, or
`@name` for the abstract namespace). Each message is one datagram of newline-separated
`KEY=value` assignments: `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`. With
`WatchdogSec=` systemd also passes `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process meant to
ping); a service that does not send `WATCHDOG=1` within that time is killed and, with
`Restart=on-failure`, restarted. Outside systemd (`$NOTIFY_SOCKET` unset) everything here is a
silent no-op, so the worker calls it unconditionally.

    notifier = SystemdNotifier()
    notifier.ready("queued 0, running 0, earned 0 sat")
    task = asyncio.create_task(watchdog_loop(notifier, lambda: worker_status_line()))
    ...
    notifier.stopping()   # on SIGTERM, before draining
    task.cancel()         # after the drain (systemd's watchdog is off while stopping)
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("dvm.sdnotify")

STATUS_ONLY_INTERVAL = 10.0  # seconds between STATUS= updates when there is no watchdog


class SystemdNotifier:
    """Talks to systemd over `$NOTIFY_SOCKET`; a no-op when there is none.

    `env` defaults to `os.environ` (read once, here); `pid` to this process's id, which
    `$WATCHDOG_PID` must match for the watchdog to count as enabled (sd_watchdog_enabled)."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None):
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    @property
    def watchdog_usec(self) -> int | None:
        """systemd's watchdog timeout in microseconds (`WatchdogSec=`), or None."""
        return self._watchdog_usec if self.enabled else None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings: half the watchdog timeout, as systemd advises;
        None when there is no watchdog for this process."""
        usec = self.watchdog_usec
        return usec / 2_000_000 if usec else None

    # messages --------------------------------------------------------------
    def ready(self, status: str = "") -> bool:
        """`READY=1` (and `STATUS=` if given): start-up is finished."""
        return self.notify("READY=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        """`STATUS=`: one line shown by `systemctl status`."""
        return self.notify(_status(text))

    def watchdog(self, status: str | None = None) -> bool:
        """`WATCHDOG=1` (and `STATUS=` if given): still alive."""
        return self.notify("WATCHDOG=1", *([_status(status)] if status is not None else []))

    def stopping(self, status: str = "") -> bool:
        """`STOPPING=1` (and `STATUS=` if given): shutting down, on purpose."""
        return self.notify("STOPPING=1", *([_status(status)] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """`EXTEND_TIMEOUT_USEC=`: ask for `seconds` more from now before the start/stop
        timeout (TimeoutStartSec=/TimeoutStopSec=) fires; systemd ≥ 236."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of `KEY=value` lines. True if it was sent; False when not under
        systemd or when sending failed (logged, never raised: the service goes on)."""
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # a datagram send blocks only if systemd's queue is full; never hang the loop on it
                self._sock.settimeout(1.0)
            self._sock.sendto(data, self._address)
            return True
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc), message=data.decode(errors="replace")[:80])
            self.close()
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(notifier: SystemdNotifier, status_fn: Callable[[], str],
                        interval: float | None = None) -> None:
    """Until cancelled: every `interval` seconds (default: the notifier's `watchdog_interval`,
    half of `WatchdogSec=`) send `WATCHDOG=1` with `STATUS=<status_fn()>`; the first at once.
    Without a watchdog, send the status alone (every `interval`, default ~10 s). Returns at
    once when not under systemd.

    It runs on the event loop, so a loop that is stuck stops the pings and systemd restarts
    the service: that is the point. A `status_fn` that raises costs only the status line."""
    if not notifier.enabled:
        return
    watchdog = notifier.watchdog_interval is not None
    period = interval or notifier.watchdog_interval or STATUS_ONLY_INTERVAL
    while True:
        try:
            status = status_fn()
        except Exception as exc:  # noqa: BLE001 - the watchdog must keep going
            log.warning("status line failed", error=repr(exc))
            status = None
        if watchdog:
            notifier.watchdog(status)
        elif status is not None:
            notifier.status(status)
        await asyncio.sleep(period)


# helpers ---------------------------------------------------------------------
def _socket_address(value: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` as an address for sendto: an absolute path, or `@name` for the
    abstract namespace (a leading NUL byte). Anything else (unset, relative, vsock:…) is
    not ours to use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        log.warning("NOTIFY_SOCKET not supported; not notifying systemd", notify_socket=value)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """sd_watchdog_enabled(): `$WATCHDOG_USEC` if set, a positive integer, and `$WATCHDOG_PID`
    (when set) names this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if env.get("WATCHDOG_PID"):
        try:
            if int(env["WATCHDOG_PID"]) != pid:
                return None
        except ValueError:
            return None
    return usec


def _status(text: str) -> str:
    """One `STATUS=` assignment: newlines would start new assignments, so they become spaces."""
    return "STATUS=" + " ".join(str(text).splitlines())
