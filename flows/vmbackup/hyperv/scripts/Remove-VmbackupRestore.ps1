<#
.SYNOPSIS
    Undo a restore: the VM registered in its folder, its share, its folder and
    its entry; with -KeepVm (the restore succeeded) only the staging
    subfolder, the share and the entry.
.DESCRIPTION
    Only a VM whose ConfigurationLocation is the restore's own folder is
    removed (New-VmbackupRestore.ps1 made that folder; it did not exist
    before), and with -VMId only that VM. An in-place restore's folder is
    the VM's own and is never removed. Without an entry (a restored VM
    removed at a drill's end, after its restore completed), -Path names the
    folder. Removing what is already gone is not an error.
    Run by hand:  .\Remove-VmbackupRestore.ps1 -RestoreId r1
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^[A-Za-z0-9-]{1,64}$')][string]$RestoreId,
    [bool]$KeepVm = $false,
    [string]$VMId = '',
    [string]$Path = '',
    [string]$WorkDir = 'C:\ProgramData\vmbackup'
)
$ErrorActionPreference = 'Stop'

$entryFile = Join-Path (Join-Path $WorkDir 'restores') "$RestoreId.json"
$entry = if (Test-Path -LiteralPath $entryFile) { Get-Content -LiteralPath $entryFile -Raw | ConvertFrom-Json } else { $null }
$folder = if ($entry) { [string]$entry.Path } else { $Path }
$removed = @()
# an in-place restore's VM is the user's own: never removed
if (-not $KeepVm -and $folder -and -not ($entry -and $entry.InPlace)) {
    foreach ($vm in @(Get-VM)) {
        if ($vm.ConfigurationLocation.TrimEnd('\') -ne $folder.TrimEnd('\')) { continue }
        if ($VMId -and ([string]$vm.Id) -ne $VMId) { continue }
        if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
        Remove-VM -VM $vm -Force
        $removed += $vm.Name
    }
}
if ($entry -and $entry.Share) { Remove-SmbShare -Name $entry.Share -Force -ErrorAction SilentlyContinue }
if ($entry) {
    if (Test-Path -LiteralPath $entry.StagePath) { Remove-Item -LiteralPath $entry.StagePath -Recurse -Force }
    if (-not $KeepVm -and -not $entry.InPlace -and (Test-Path -LiteralPath $entry.Path)) { Remove-Item -LiteralPath $entry.Path -Recurse -Force }
    Remove-Item -LiteralPath $entryFile -Force
} elseif ($folder -and -not $KeepVm -and (Test-Path -LiteralPath $folder)) {
    Remove-Item -LiteralPath $folder -Recurse -Force
}
[pscustomobject]@{ RestoreId = $RestoreId; RemovedVMs = @($removed); Path = $folder }
