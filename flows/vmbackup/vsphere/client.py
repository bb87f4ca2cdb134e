"""A verified, self-healing pyVmomi session to vCenter or a standalone ESXi host.

TLS is always verified: against the plan's CA file (with the host name
checked), or against a pinned SHA-256 fingerprint of the server's certificate
(the probed certificate becomes the only trust anchor of the session, so
every later connection of the pool is held to it too). With both, both must
hold. There is no unverified fallback.

The session is a ``VimSessionOrientedStub``: a call answered with
``NotAuthenticated`` (vCenter dropped or timed the session out) logs in again
and is repeated, for every managed object of this client.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pyVim.connect import SmartStubAdapter, VimSessionOrientedStub
from pyVmomi import vim, vmodl

from ..errors import AuthenticationError, CertificateError, SessionLostError, VmNotFoundError
from ..plan import Connection
from .faults import hypervisor_error

log = logging.getLogger(__name__)

# Objects per PropertyCollector answer; vCenter may send fewer, with a token to go on.
PAGE_OBJECTS = 1000


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def check_pinned(der: bytes, thumbprint: str, where: str) -> None:
    """CertificateError unless the certificate ``der`` has the pinned SHA-256 fingerprint."""
    got = _fingerprint(der)
    if got != thumbprint:
        raise CertificateError(
            f"the TLS certificate of {where} has SHA-256 fingerprint {got}, not the pinned {thumbprint}"
        )


def _peer_certificate(host: str, port: int, context: ssl.SSLContext, timeout: float = 30) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise CertificateError(f"{host}:{port} sent no certificate")
    return der


def ssl_context(conn: Connection) -> tuple[ssl.SSLContext, str | None]:
    """The context every connection of the session uses, and the trusted PEM when pinned.

    Raises CertificateError if the server's certificate is not trusted.
    """
    where = f"{conn.host}:{conn.port}"
    try:
        if conn.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(conn.ca_file))
            if conn.thumbprint is None:
                _peer_certificate(conn.host, conn.port, ctx)
                return ctx, None
            der = _peer_certificate(conn.host, conn.port, ctx)
        else:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            # The probe only fetches the certificate; it is trusted below by
            # its fingerprint, before anything is sent over a connection.
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            der = _peer_certificate(conn.host, conn.port, probe)
    except ssl.SSLCertVerificationError as e:
        raise CertificateError(
            f"the TLS certificate of {where} is not trusted by {conn.ca_file}: {e.verify_message}"
        ) from None
    except ssl.SSLError as e:
        raise CertificateError(f"TLS with {where} failed: {e.reason or e}") from None
    except OSError as e:
        raise SessionLostError(f"cannot reach vSphere at {where}: {e.strerror or e}") from None
    check_pinned(der, conn.thumbprint or "", where)
    if conn.ca_file is not None:
        return ctx, None
    pem = ssl.DER_cert_to_PEM_cert(der)
    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False  # the pin names the certificate itself
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned leaf is the trust anchor
    return ctx, pem


class VSphereClient:
    """One logged-in session; thread-safe as pyVmomi stubs are (a pool of connections)."""

    def __init__(self, conn: Connection, password: SecretStr, stub: Any, soap: Any, pinned_pem: str | None):
        self.conn = conn
        self._password = password
        self._stub = stub
        self._soap = soap
        self.pinned_pem = pinned_pem
        self.ssl_context: ssl.SSLContext | None = None
        self.si = vim.ServiceInstance("ServiceInstance", stub)
        self._content: Any = None
        self._lock = threading.Lock()
        self._views: dict[type, Any] = {}
        self._vm_index: dict[str, list[Any]] | None = None
        self.logins = 0

    @classmethod
    def connect(cls, conn: Connection, password: SecretStr) -> VSphereClient:
        """Logs in. Raises CertificateError, AuthenticationError or SessionLostError."""
        ctx, pem = ssl_context(conn)
        where = f"{conn.host}:{conn.port}"
        try:
            soap = SmartStubAdapter(host=conn.host, port=conn.port, path=conn.path, sslContext=ctx)
        except ssl.SSLError as e:
            raise CertificateError(f"TLS with {where} failed: {getattr(e, 'reason', None) or e}") from None
        except OSError as e:
            raise SessionLostError(f"cannot reach vSphere at {where}: {e.strerror or e}") from None
        holder: dict[str, VSphereClient] = {}

        def login(stub: Any) -> None:
            si = vim.ServiceInstance("ServiceInstance", stub)
            # The password leaves its SecretStr only here, for the Login call.
            si.content.sessionManager.Login(conn.user, password.get_secret_value(), None)
            if "client" in holder:
                holder["client"].logins += 1
                log.info("logged in to %s again (the session was dropped)", where)

        stub = VimSessionOrientedStub(soap, login, retryDelay=0.2, retryCount=3)
        client = cls(conn, password, stub, soap, pem)
        client.ssl_context = ctx
        try:
            client.content  # noqa: B018 (logs in)
        except vim.fault.InvalidLogin:
            raise AuthenticationError(
                f"vSphere at {where} refused user {conn.user}: wrong user name or password"
            ) from None
        except vmodl.MethodFault as e:
            raise hypervisor_error(f"logging in to {where}", e) from None
        except ssl.SSLError as e:
            raise CertificateError(f"TLS with {where} failed: {getattr(e, 'reason', None) or e}") from None
        except OSError as e:
            raise SessionLostError(f"cannot reach vSphere at {where}: {e.strerror or e}") from None
        holder["client"] = client
        client.logins = 1
        return client

    @property
    def content(self) -> Any:
        if self._content is None:
            self._content = self.si.RetrieveContent()
        return self._content

    @property
    def cookie(self) -> str:
        """The session cookie (``vmware_soap_session="..."``) for datastore HTTP access. A secret."""
        self.content.sessionManager.currentSession  # noqa: B018 (logs in again if needed)
        return self._soap.cookie

    @property
    def base_url(self) -> str:
        port = "" if self.conn.port == 443 else f":{self.conn.port}"
        return f"https://{self.conn.host}{port}"

    def close(self) -> None:
        try:
            if self._soap.cookie:
                sm = vim.ServiceInstance("ServiceInstance", self._soap).content.sessionManager
                sm.Logout()
        except Exception:  # the session may be gone already; nothing to clean up then
            pass
        self._soap.DropConnections()

    def __enter__(self) -> VSphereClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Lookups. Each is a constant number of API calls whatever the inventory's
    # size (docs/vsphere.md, "API calls"): one PropertyCollector request for
    # just the properties needed, never a round trip per object.
    def objects(self, kind: type) -> list[Any]:
        """Every object of ``kind`` (references only: reading a property of each is a call each)."""
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def _view(self, kind: type) -> Any:
        """A container view of every ``kind`` under the root folder, made once per session.

        vSphere keeps a view up to date as the inventory changes; logout destroys it.
        """
        with self._lock:
            view = self._views.get(kind)
            if view is None:
                view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
                self._views[kind] = view
            return view

    def retrieve(self, specs: list[Any]) -> list[Any]:
        """``RetrievePropertiesEx`` paged to the end with ``ContinueRetrievePropertiesEx``."""
        pc = self.content.propertyCollector
        res = pc.RetrievePropertiesEx(specs, vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=PAGE_OBJECTS))
        out: list[Any] = []
        while res is not None:
            out += list(res.objects or [])
            if not res.token:
                break
            res = pc.ContinueRetrievePropertiesEx(res.token)
        return out

    def properties_of_all(self, kind: type, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        """``(object, {path: value})`` of every ``kind`` in the inventory: one request per page.

        An unset property is absent from the dict.
        """
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=self._view(kind),
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=paths)],
        )
        try:
            found = self.retrieve([spec])
        except vmodl.fault.ManagedObjectNotFound:  # the view went with a dropped session: make another
            with self._lock:
                self._views.pop(kind, None)
            spec.objectSet[0].obj = self._view(kind)
            found = self.retrieve([spec])
        return [(o.obj, {p.name: p.val for p in o.propSet or []}) for o in found]

    def properties(self, objs: list[Any], paths: list[str]) -> dict[str, dict[str, Any]]:
        """``{moref: {path: value}}`` of the given objects (one kind) in one request.

        An object that no longer exists is left out.
        """
        if not objs:
            return {}
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objs],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(objs[0]), pathSet=paths)],
            reportMissingObjectsInResults=True,
        )
        return {o.obj._moId: {p.name: p.val for p in o.propSet or []} for o in self.retrieve([spec])}

    def vm_index(self, refresh: bool = False) -> dict[str, list[Any]]:
        """VM name -> the VMs of that name, from one request; kept until ``refresh``.

        The selection refreshes it once per run; lookups of VMs that do not
        move while a run is at work on them (agent VMs, the clones of a run's
        VMs) use it without a call.
        """
        with self._lock:
            index = None if refresh else self._vm_index
        if index is None:
            index = {}
            for vm, props in self.properties_of_all(vim.VirtualMachine, ["name"]):
                if "name" in props:
                    index.setdefault(props["name"], []).append(vm)
            with self._lock:
                self._vm_index = index
        return index

    def set_vm_index(self, index: dict[str, list[Any]]) -> None:
        """Replaces the VM index with one read by a caller's own request (the selection's)."""
        with self._lock:
            self._vm_index = index

    def vm_named(self, name: str) -> Any:
        """A VM of this name (from the index, looked up afresh once if it is not there), or None."""
        vms = self.vm_index().get(name)
        if not vms:
            vms = self.vm_index(refresh=True).get(name)
        return vms[0] if vms else None

    def find_vm(self, name: str) -> Any:
        """The VM named ``name``, looked up afresh (one request); VmNotFoundError if none."""
        vms = self.vm_index(refresh=True).get(name)
        if not vms:
            raise VmNotFoundError(f"VM {name} does not exist in {self.conn.host}")
        return vms[0]

    def vm_by_moref(self, moref: str) -> Any:
        return vim.VirtualMachine(moref, self._stub)

    def datacenter_of(self, obj: Any) -> Any:
        while obj is not None and not isinstance(obj, vim.Datacenter):
            obj = obj.parent
        return obj

    def ca_file_for_tools(self, workdir: Path) -> str:
        """A CA file for helper tools (nbdkit curl): the plan's, or the pinned certificate."""
        if self.conn.ca_file is not None:
            return str(self.conn.ca_file)
        path = workdir / "pinned.pem"
        path.write_text(self.pinned_pem or "")
        return str(path)
