<#
.SYNOPSIS
    The restores open on this host: the entries New-VmbackupRestore.ps1 wrote
    and Remove-VmbackupRestore.ps1 has not removed yet.
.DESCRIPTION
    Read-only. The sweeper removes the entries of restores that are not
    running any more (judged from the repository's ledger).
#>
param(
    [string]$WorkDir = 'C:\ProgramData\vmbackup'
)
$ErrorActionPreference = 'Stop'

$dir = Join-Path $WorkDir 'restores'
$entries = @()
if (Test-Path -LiteralPath $dir) {
    $entries = @(Get-ChildItem -LiteralPath $dir -Filter '*.json' | Sort-Object Name | ForEach-Object { Get-Content -LiteralPath $_.FullName -Raw | ConvertFrom-Json })
}
[pscustomobject]@{ ComputerName = $env:COMPUTERNAME; Restores = $entries }
