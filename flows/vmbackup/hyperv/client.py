"""A thin WinRM client for the Hyper-V adapter, on pywinrm.

One call runs one adapter script (see `scripts.py`) and returns its parsed
JSON answer. Every failure becomes exactly one `vmbackup.errors` class with a
one-line message that names the host and never the password:
wrong credentials (`WinRMAuthenticationError`), an untrusted certificate
(`WinRMCertificateError`), nothing listening (`WinRMUnreachableError`), a
shell or connection lost mid-call (`WinRMSessionLostError`, retryable), and a
script's own failure (`HypervScriptError` and subclasses).

Transports: HTTPS with the server certificate verified (against `ca_file`,
or the system's trust store without it) is the default; NTLM over plain HTTP
is allowed only with message encryption (pywinrm's multipart/encrypted
bodies); Basic only over HTTPS; Kerberos and CredSSP are selectable when their
pywinrm extras are installed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
import winrm
import winrm.exceptions as wexc

from vmbackup.errors import (
    HypervQuiesceError,
    HypervScriptError,
    HypervVmNotFoundError,
    InvalidInputError,
    WinRMAuthenticationError,
    WinRMCertificateError,
    WinRMError,
    WinRMSessionLostError,
    WinRMUnreachableError,
)
from vmbackup.hyperv import scripts

log = logging.getLogger(__name__)

Auth = Literal["ntlm", "basic", "kerberos", "credssp"]
AUTHS = ("ntlm", "basic", "kerberos", "credssp")

# WSManFault code: the shell (or command) no longer exists on the server.
SHELL_NOT_FOUND = 2150858843
# Windows' command line limit (CreateProcess): powershell -encodedcommand must fit.
MAX_COMMAND_LINE = 32767

_SCRIPT_ERRORS = {"VmNotFound": HypervVmNotFoundError, "QuiesceUnavailable": HypervQuiesceError}

# VSS creates one shadow copy set at a time per host: another requester's
# StartSnapshotSet fails with VSS_E_SNAPSHOT_SET_IN_PROGRESS (0x80042316) and
# "should wait and try again" (Microsoft, "State Transitions in Shadow Copy
# Providers"). New-VmbackupShadowCopy.ps1 reports it as this code, having made
# nothing; the client waits and runs the script again.
SET_IN_PROGRESS = "ShadowSetInProgress"
# How long a script is retried while another set is being created on the host
# (a set's creation takes seconds; VSS's own limit for a freeze is 60 s per set).
SHADOW_SET_WAIT = 600.0


@dataclass(frozen=True)
class Result:
    """What a command printed and how it ended."""

    stdout: str
    stderr: str
    status: int


def _secret(password: Any) -> str:
    return password.get_secret_value() if hasattr(password, "get_secret_value") else str(password)


class HypervClient:
    """WinRM to one Hyper-V host.

    Args:
        url: ``https://host:5986/wsman`` (or ``http://host:5985/wsman`` with NTLM).
        user: ``DOMAIN\\user``, ``user@domain`` or a local user.
        password: a str or a pydantic ``SecretStr``; kept only in memory.
        auth: ntlm (default), basic, kerberos or credssp.
        ca_file: the CA to verify the server's certificate with (HTTPS);
            without it the system's trust store is used. Never unverified.
    """

    def __init__(
        self,
        url: str,
        user: str,
        password: Any,
        *,
        auth: Auth = "ntlm",
        ca_file: Path | str | None = None,
        operation_timeout: int = 20,
        read_timeout: int = 30,
        shadow_set_wait: float = SHADOW_SET_WAIT,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInputError(f"WinRM URL {url!r} is not http(s)://host[:port]/wsman")
        if auth not in AUTHS:
            raise InvalidInputError(f"WinRM auth {auth!r} is not one of {', '.join(AUTHS)}")
        if parts.scheme == "http" and auth == "basic":
            raise InvalidInputError(
                f"{url}: Basic authentication would send the password in clear over HTTP; use HTTPS"
            )
        if ca_file is not None and not Path(ca_file).is_file():
            raise InvalidInputError(f"CA file {ca_file} does not exist")
        self.url = url
        self.host = parts.hostname
        self.auth = auth
        # seconds a script reporting another shadow copy set in progress is
        # retried, with back-off (0: not retried)
        self.shadow_set_wait = shadow_set_wait
        # how many times this client waited for another set (for reports and tests)
        self.shadow_set_waits = 0
        kwargs: dict[str, Any] = {
            "transport": auth,
            "server_cert_validation": "validate",
            "operation_timeout_sec": operation_timeout,
            "read_timeout_sec": read_timeout,
            "proxy": None,
        }
        if ca_file is not None:
            kwargs["ca_trust_path"] = os.fspath(ca_file)
        if parts.scheme == "http":
            # NTLM, Kerberos and CredSSP seal every message over HTTP; refuse
            # to run rather than send scripts and answers in clear.
            kwargs["message_encryption"] = "always"
        try:
            self._session = winrm.Session(url, auth=(user, _secret(password)), **kwargs)
        except wexc.WinRMError as e:
            raise WinRMError(f"WinRM to {self.host}: {e}") from None

    def run_ps(self, text: str) -> Result:
        """Run PowerShell text as pywinrm's ``Session.run_ps`` does."""
        if len(text.encode("utf-16-le")) * 4 // 3 + 40 > MAX_COMMAND_LINE:
            raise InvalidInputError(f"PowerShell of {len(text)} characters is too long for one command line")
        return self._call(lambda: self._session.run_ps(text))

    def run_cmd(self, command: str, args: list[str] | tuple[str, ...] = ()) -> Result:
        """Run a command in a cmd shell."""
        return self._call(lambda: self._session.run_cmd(command, list(args)))

    def run_script(self, name: str, params: dict | None = None) -> Any:
        """Run adapter script `name` with `params` (JSON-able) and return its JSON answer.

        While the host reports another shadow copy set in progress
        (`SET_IN_PROGRESS`; the script then made nothing), the script is run
        again after a back-off with jitter (0.25 s doubling to 8 s), for at most
        ``shadow_set_wait`` seconds; then the last error is raised, saying how long
        it waited.
        """
        deadline = time.monotonic() + self.shadow_set_wait
        delay = 0.25
        while True:
            try:
                return self._run_script_once(name, params)
            except HypervScriptError as e:
                if e.code != SET_IN_PROGRESS:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.shadow_set_wait <= 0:
                        raise
                    raise HypervScriptError(
                        f"{e} (waited {self.shadow_set_wait:.0f} s for the other set)", SET_IN_PROGRESS
                    ) from None
                pause = min(left, delay * (0.5 + random.random()))
                self.shadow_set_waits += 1
                log.info(
                    "%s on %s: another shadow copy set is being created; trying again in %.2f s", name, self.host, pause
                )
                time.sleep(pause)
                delay = min(delay * 2, 8.0)

    def _run_script_once(self, name: str, params: dict | None) -> Any:
        r = self.run_ps(scripts.wrap(name, params or {}))
        try:
            answer: Any = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            first = (r.stdout.strip().splitlines() or [""])[0][:200]
            raise HypervScriptError(
                f"{name} on {self.host} did not answer JSON (exit status {r.status}): {first}"
            ) from None
        if r.status == 0:
            return answer
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            text = answer["error"]
            code, sep, rest = text.partition(": ")
            code = code if sep and code.isalnum() else "ScriptFailed"
            cls = _SCRIPT_ERRORS.get(code, HypervScriptError)
            raise cls(f"{name} on {self.host}: {text}", code)
        first = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or [f"exit status {r.status}"])[0]
        raise HypervScriptError(f"{name} on {self.host} failed: {first}")

    def _call(self, fn) -> Result:
        where = f"WinRM at {self.url}"
        try:
            r = fn()
        except wexc.InvalidCredentialsError:
            raise WinRMAuthenticationError(f"{where}: the user name or password was rejected") from None
        except requests.exceptions.SSLError as e:
            raise WinRMCertificateError(f"{where}: the server certificate is not trusted: {_reason(e)}") from None
        except requests.exceptions.ConnectionError as e:
            if _reset(e):
                raise WinRMSessionLostError(f"{where}: the connection was dropped: {_reason(e)}") from None
            raise WinRMUnreachableError(f"{where}: unreachable: {_reason(e)}") from None
        except requests.exceptions.Timeout:
            raise WinRMUnreachableError(f"{where}: no answer in time") from None
        except wexc.WSManFaultError as e:
            if e.wsman_fault_code == SHELL_NOT_FOUND:
                raise WinRMSessionLostError(f"{where}: the remote shell was closed by the server") from None
            raise WinRMError(f"{where}: {e.reason.strip()}") from None
        except wexc.WinRMTransportError as e:
            # After a dropped connection pywinrm re-authenticates but the
            # request was sealed with the old session's keys: the server
            # cannot read it (400) or fails it (500).
            raise WinRMSessionLostError(f"{where}: the session was lost (HTTP {e.code})") from None
        except wexc.WinRMError as e:
            raise WinRMError(f"{where}: {e}") from None
        return Result(
            stdout=r.std_out.decode("utf-8", "replace"),
            stderr=r.std_err.decode("utf-8", "replace"),
            status=r.status_code,
        )


def _reason(e: Exception) -> str:
    """The innermost cause of a requests error, on one line."""
    inner: BaseException = e
    while True:
        nxt = (
            inner.__cause__
            or inner.__context__
            or (inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None)
        )
        if nxt is None or nxt is inner:
            break
        inner = nxt
    reason = getattr(inner, "reason", None)
    text = str(reason if isinstance(reason, BaseException) else inner)
    return " ".join(text.split())[:200]


def _reset(e: Exception) -> bool:
    text = repr(e).lower()
    return any(
        k in text
        for k in ("connection reset", "connectionreset", "remote end closed", "connection aborted", "broken pipe")
    )
