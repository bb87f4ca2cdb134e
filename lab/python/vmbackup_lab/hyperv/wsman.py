"""WS-Management envelopes of the WinRM remote shell (MS-WSMV), apart from sockets.

A request is parsed into a `Request` (action, resource URI, message id,
selectors, body element); answers are built as text. Only what the Windows
remote shell resource (`.../windows/shell/cmd`) uses is covered: Create,
Command, Receive, Signal, Delete, and SOAP faults with a WSManFault detail.
"""

from __future__ import annotations

import base64
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

SOAP = "http://www.w3.org/2003/05/soap-envelope"
ADDRESSING = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
FAULT = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"

RESOURCE_CMD = SHELL + "/cmd"
ACTION_CREATE = TRANSFER + "/Create"
ACTION_DELETE = TRANSFER + "/Delete"
ACTION_COMMAND = SHELL + "/Command"
ACTION_RECEIVE = SHELL + "/Receive"
ACTION_SIGNAL = SHELL + "/Signal"
ACTION_SEND = SHELL + "/Send"
STATE_DONE = SHELL + "/CommandState/Done"
STATE_RUNNING = SHELL + "/CommandState/Running"
SIGNAL_TERMINATE = SHELL + "/signal/terminate"
SIGNAL_CTRL_C = SHELL + "/signal/ctrl_c"

# WSManFault codes as Windows sends them (winerror.h, facility WinRM 0x8033).
SHELL_NOT_FOUND = 0x8033805B  # 2150858843: the shell (or command) does not exist any more
OPERATION_TIMEOUT = 0x80338029  # 2150858793: Receive found no output within the timeout
INVALID_SELECTORS = 0x80338041
ACTION_NOT_SUPPORTED = 0x80338115


class BadRequest(Exception):
    """The envelope is not one this server understands."""


@dataclass(frozen=True)
class Fault(Exception):
    """A SOAP fault to answer with (HTTP 500)."""

    subcode: str  # e.g. "w:InvalidSelectors"
    code: int
    message: str
    sender: bool = True


@dataclass
class Request:
    action: str
    resource_uri: str
    message_id: str
    selectors: dict[str, str]
    options: dict[str, str]
    body: ET.Element | None


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def parse(data: bytes) -> Request:
    """Parse a request envelope (UTF-8 or UTF-16 XML as a client sends it)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise BadRequest(f"envelope is not XML: {e}") from e
    if root.tag != _q(SOAP, "Envelope"):
        raise BadRequest("not a SOAP 1.2 envelope")
    header = root.find(_q(SOAP, "Header"))
    body = root.find(_q(SOAP, "Body"))
    if header is None:
        raise BadRequest("envelope without a header")

    def text(ns: str, tag: str) -> str:
        el = header.find(_q(ns, tag))
        return (el.text or "").strip() if el is not None else ""

    selectors = {
        s.get("Name", ""): (s.text or "").strip()
        for s in header.iterfind(f"{_q(WSMAN, 'SelectorSet')}/{_q(WSMAN, 'Selector')}")
    }
    options = {
        o.get("Name", ""): (o.text or "").strip()
        for o in header.iterfind(f"{_q(WSMAN, 'OptionSet')}/{_q(WSMAN, 'Option')}")
    }
    first = None
    if body is not None and len(body):
        first = body[0]
    return Request(
        action=text(ADDRESSING, "Action"),
        resource_uri=text(WSMAN, "ResourceURI"),
        message_id=text(ADDRESSING, "MessageID"),
        selectors=selectors,
        options=options,
        body=first,
    )


def command_line(body: ET.Element | None) -> tuple[str, list[str]]:
    """The command and arguments of a Command request body."""
    if body is None or body.tag != _q(SHELL, "CommandLine"):
        raise BadRequest("Command without rsp:CommandLine")
    cmd = body.find(_q(SHELL, "Command"))
    args = [a.text or "" for a in body.iterfind(_q(SHELL, "Arguments"))]
    return ((cmd.text or "").strip() if cmd is not None else ""), args


def command_id_of(body: ET.Element | None, element: str) -> str:
    """The CommandId a Receive (in rsp:DesiredStream) or Signal names."""
    if body is None:
        raise BadRequest(f"{element} without a body")
    if element == "Receive":
        ds = body.find(_q(SHELL, "DesiredStream"))
        return ds.get("CommandId", "") if ds is not None else ""
    if element == "Signal":
        return body.get("CommandId", "")
    raise BadRequest(element)


def signal_code(body: ET.Element | None) -> str:
    code = body.find(_q(SHELL, "Code")) if body is not None else None
    return (code.text or "").strip() if code is not None else ""


_NS = (
    f'xmlns:s="{SOAP}" xmlns:a="{ADDRESSING}" xmlns:x="{TRANSFER}" xmlns:w="{WSMAN}" '
    f'xmlns:rsp="{SHELL}" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"'
)


def envelope(action: str, relates_to: str, body: str) -> bytes:
    """A response envelope; `body` is already XML."""
    return (
        f'<s:Envelope xml:lang="en-US" {_NS}><s:Header>'
        f"<a:Action>{escape(action)}</a:Action>"
        f"<a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
        f"<a:To>{ADDRESSING}/role/anonymous</a:To>"
        f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def create_response(req: Request, address: str, shell_id: str) -> bytes:
    body = (
        f"<x:ResourceCreated><a:Address>{escape(address)}</a:Address><a:ReferenceParameters>"
        f"<w:ResourceURI>{RESOURCE_CMD}</w:ResourceURI>"
        f'<w:SelectorSet><w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
        f"</a:ReferenceParameters></x:ResourceCreated>"
        f"<rsp:Shell><rsp:ShellId>{shell_id}</rsp:ShellId><rsp:ResourceUri>{RESOURCE_CMD}</rsp:ResourceUri>"
        f"<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>"
    )
    return envelope(TRANSFER + "/CreateResponse", req.message_id, body)


def command_response(req: Request, command_id: str) -> bytes:
    body = f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId></rsp:CommandResponse>"
    return envelope(SHELL + "/CommandResponse", req.message_id, body)


def receive_response(req: Request, command_id: str, stdout: bytes, stderr: bytes, done: bool, exit_code: int) -> bytes:
    cid = quoteattr(command_id)
    parts = ["<rsp:ReceiveResponse>"]
    for name, data in (("stdout", stdout), ("stderr", stderr)):
        if data:
            parts.append(f'<rsp:Stream Name="{name}" CommandId={cid}>{base64.b64encode(data).decode()}</rsp:Stream>')
        if done:
            parts.append(f'<rsp:Stream Name="{name}" CommandId={cid} End="true"></rsp:Stream>')
    if done:
        parts.append(
            f'<rsp:CommandState CommandId={cid} State="{STATE_DONE}"><rsp:ExitCode>{exit_code}</rsp:ExitCode></rsp:CommandState>'
        )
    else:
        parts.append(f'<rsp:CommandState CommandId={cid} State="{STATE_RUNNING}"></rsp:CommandState>')
    parts.append("</rsp:ReceiveResponse>")
    return envelope(SHELL + "/ReceiveResponse", req.message_id, "".join(parts))


def signal_response(req: Request) -> bytes:
    return envelope(SHELL + "/SignalResponse", req.message_id, "<rsp:SignalResponse/>")


def delete_response(req: Request) -> bytes:
    return envelope(TRANSFER + "/DeleteResponse", req.message_id, "")


def fault_response(relates_to: str, fault: Fault, machine: str) -> bytes:
    value = "s:Sender" if fault.sender else "s:Receiver"
    body = (
        f"<s:Fault><s:Code><s:Value>{value}</s:Value><s:Subcode><s:Value>{escape(fault.subcode)}</s:Value>"
        f'</s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{escape(fault.message)}</s:Text></s:Reason>'
        f'<s:Detail><f:WSManFault xmlns:f="{FAULT}" Code="{fault.code}" Machine={quoteattr(machine)}>'
        f"<f:Message>{escape(fault.message)}</f:Message></f:WSManFault></s:Detail></s:Fault>"
    )
    return envelope(ADDRESSING + "/fault", relates_to, body)
