"""A TLS relay that holds a helper tool to the pinned certificate.

nbdkit's curl plugin checks the server's host name against its certificate
whatever CA it is given, and has no option to compare a fingerprint instead
(nbdkit 1.32: only ``sslverify=false``, which checks nothing and is never
used). An ESXi host's self-signed certificate reached by its IP address names
another host, so a pinned thumbprint would not work for ``nbd``.

So with a pin, nbdkit speaks plain HTTP over a Unix socket
(``unix-socket-path=``) to this relay, in the agent's own process, and the
relay does the TLS: per connection it opens TLS to the real server with the
session's pinned context (the pinned certificate its only trust anchor) and
compares the certificate's SHA-256 fingerprint with the pin
(``client.check_pinned``, as the SOAP session does) before a byte of the
request is sent; then it copies bytes both ways. The socket is in the
transport's private directory (0700, the agent's user only). Nothing of the
traffic (the session cookie) is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from pathlib import Path

from ..errors import CertificateError, HypervisorError, SessionLostError
from .client import check_pinned

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
BUFFER = 1 << 18


class PinnedRelay:
    """A Unix-socket listener at ``path`` relaying each connection over TLS to
    ``host:port``, held to ``thumbprint`` (SHA-256, lower-case hex).

    ``start`` returns once it listens; ``check`` tries the pin once;
    ``close`` stops it and drops every connection (safe to call twice). A
    connection refused later is logged (one line) and closed, so nbdkit's
    request fails.
    """

    def __init__(self, path: Path, host: str, port: int, context: ssl.SSLContext, thumbprint: str):
        self.path = path
        self.host = host
        self.port = port
        self.where = f"{host}:{port}"
        self._context = context
        self._thumbprint = thumbprint
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- the caller's side (any thread) ------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tls-relay-{self.where}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise HypervisorError(f"the TLS relay to {self.where} did not start: {self._failed}") from None

    def check(self) -> None:
        """One TLS connection to the server, held to the pin, then closed.

        Raises CertificateError (the certificate is not the pinned one) or
        SessionLostError (the server cannot be reached).
        """
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._check(), self._loop).result(CONNECT_TIMEOUT + 5)

    def close(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- the relay's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 (handed to start's caller)
            self._failed = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)  # the directory is 0700 already; the socket too is the agent's alone
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()  # no new connections; then the open ones are dropped
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """TLS to the server, its certificate checked against the pin before anything is sent."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._context, server_hostname=self.host),
                CONNECT_TIMEOUT,
            )
        except ssl.SSLCertVerificationError as e:
            raise CertificateError(
                f"the TLS certificate of {self.where} is not the pinned one: {e.verify_message}"
            ) from None
        except ssl.SSLError as e:
            raise CertificateError(f"TLS with {self.where} failed: {e.reason or e}") from None
        except OSError as e:  # TimeoutError included
            why = e.strerror or str(e) or "timed out"
            raise SessionLostError(f"cannot reach vSphere at {self.where}: {why}") from None
        tls = writer.get_extra_info("ssl_object")
        try:
            check_pinned(tls.getpeercert(binary_form=True) or b"", self._thumbprint, self.where)
        except CertificateError:
            writer.close()
            raise
        return reader, writer

    async def _check(self) -> None:
        _, writer = await self._open()
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    async def _serve(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        try:
            remote_r, remote_w = await self._open()
        except (CertificateError, SessionLostError) as e:
            log.warning("TLS relay to %s refused a connection: %s", self.where, e)
            local_w.close()
            return
        pumps = [asyncio.ensure_future(_pump(local_r, remote_w)), asyncio.ensure_future(_pump(remote_r, local_w))]
        try:
            # Either side closing ends the connection (HTTP does not half-close).
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (remote_w, local_w):
                w.close()
                with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                    await w.wait_closed()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await src.read(BUFFER):
            dst.write(data)
            await dst.drain()
