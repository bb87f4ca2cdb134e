<#
.SYNOPSIS
    Stage a restore: its ledger entry, then its folder (never an existing
    one), shared to the agent that writes the disks.
.DESCRIPTION
    The entry (C:\ProgramData\vmbackup\restores\<RestoreId>.json) is written
    before anything else, so that Remove-VmbackupRestore.ps1 finds whatever
    a killed restore left. The folder -Path must not exist (with -InPlace it
    is the existing VM's folder); it gets a staging subfolder
    '.vmbackup-staging' where the agent writes the VHDX files and the
    configuration files. With -ShareTo, -Path is shared as 'vmbr-<RestoreId>$'
    with full access for that account only.
    Run by hand:  .\New-VmbackupRestore.ps1 -RestoreId r1 -Name web01-r -Path 'D:\Hyper-V\web01-r'
.PARAMETER RestoreId
    The restore's id: letters, digits and '-', at most 64.
.PARAMETER ShareTo
    The agent's account (DOMAIN\user) when the agent writes through a share.
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^[A-Za-z0-9-]{1,64}$')][string]$RestoreId,
    [Parameter(Mandatory = $true)][string]$Name,
    [Parameter(Mandatory = $true)][string]$Path,
    [string]$ShareTo = '',
    [bool]$InPlace = $false,
    [string]$WorkDir = 'C:\ProgramData\vmbackup'
)
$ErrorActionPreference = 'Stop'

$ledger = Join-Path $WorkDir 'restores'
$entryFile = Join-Path $ledger "$RestoreId.json"
if (Test-Path -LiteralPath $entryFile) { throw "ScriptFailed: a restore '$RestoreId' is already open on $env:COMPUTERNAME" }
if (-not $InPlace -and (Test-Path -LiteralPath $Path)) { throw "PathExists: $Path exists on $env:COMPUTERNAME`: a restore never writes into it" }
$parent = Split-Path -Path $Path -Parent
if (-not (Test-Path -LiteralPath $parent -PathType Container)) { throw "PathNotFound: the folder $parent does not exist" }
$stage = Join-Path $Path '.vmbackup-staging'
$share = if ($ShareTo) { "vmbr-$RestoreId`$" } else { $null }
$entry = [pscustomobject]@{
    RestoreId = $RestoreId; Name = $Name; Path = $Path; StagePath = $stage; InPlace = $InPlace
    Share = $share; Created = (Get-Date).ToUniversalTime().ToString('o')
}
New-Item -ItemType Directory -Force -Path $ledger | Out-Null
$tmp = "$entryFile.tmp"
$entry | ConvertTo-Json -Compress | Set-Content -LiteralPath $tmp -Encoding UTF8
Move-Item -LiteralPath $tmp -Destination $entryFile -Force
New-Item -ItemType Directory -Force -Path (Join-Path $stage 'Virtual Machines') | Out-Null
$sharePath = $null
if ($share) {
    New-SmbShare -Name $share -Path $Path -FullAccess $ShareTo -Description "vmbackup restore $RestoreId" | Out-Null
    $sharePath = "\\$env:COMPUTERNAME\$share"
}
[pscustomobject]@{ RestoreId = $RestoreId; Path = $Path; StagePath = $stage; SharePath = $sharePath }
