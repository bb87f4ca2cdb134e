"""The adapter's PowerShell scripts and the one fixed form that runs them.

Parameters are never built into PowerShell code. They travel as data: a JSON
object, base64-encoded (so the literal holds only ``A-Za-z0-9+/=``), decoded
on the host and splatted into the script's ``param()`` block. The script's
text is sent verbatim inside a single-quoted here-string (no expansion),
without its leading comment-based help (``<# ... #>``, for the reader and
``Get-Help``), which would otherwise take a third of the 32767-character
command line that ``-EncodedCommand`` travels in. The
wrapper prints the script's result as one line of JSON on stdout and exits 0,
or prints ``{"error": "<Code>: <message>"}`` and exits 1.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from vmbackup.errors import InvalidInputError

SCRIPTS_DIR = Path(__file__).parent / "scripts"

WRAPPER = """\
# vmbackup: {name}
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$vmbackupParameters = '{params}'
$vmbackupSplat = @{{}}
$vmbackupDecoded = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($vmbackupParameters)) | ConvertFrom-Json
foreach ($p in $vmbackupDecoded.psobject.Properties) {{ $vmbackupSplat[$p.Name] = $p.Value }}
try {{
    $vmbackupResult = & ([scriptblock]::Create(@'
{script}
'@)) @vmbackupSplat
    [Console]::Out.Write((ConvertTo-Json -InputObject $vmbackupResult -Depth 8 -Compress))
    exit 0
}} catch {{
    [Console]::Out.Write((ConvertTo-Json -InputObject @{{ error = [string]$_.Exception.Message }} -Compress))
    exit 1
}}
"""


def names() -> list[str]:
    """The adapter's script names (file names without the directory)."""
    return sorted(p.name for p in SCRIPTS_DIR.glob("*.ps1"))


def text(name: str) -> str:
    """A script's text, with Windows line ends normalised to LF."""
    if name not in names():
        raise InvalidInputError(f"no adapter script named {name!r}")
    return (SCRIPTS_DIR / name).read_text(encoding="utf-8").replace("\r\n", "\n").rstrip("\n")


def body(name: str) -> str:
    """What is sent of a script: its text without the leading comment-based help block."""
    t = text(name)
    if t.startswith("<#") and "#>" in t:
        t = t[t.index("#>") + 2 :].lstrip("\n")
    return t


def encode_parameters(params: dict) -> str:
    """The base64 literal carrying `params` (JSON, UTF-8)."""
    return base64.b64encode(json.dumps(params, sort_keys=True).encode()).decode("ascii")


def wrap(name: str, params: dict) -> str:
    """The PowerShell text that runs script `name` with `params` as data."""
    sent = body(name)
    # A line starting with '@ would end the here-string early.
    if any(line.startswith("'@") for line in sent.split("\n")):
        raise InvalidInputError(f"script {name} has a line starting with '@ and cannot be sent")
    return WRAPPER.format(name=name, params=encode_parameters(params), script=sent)
