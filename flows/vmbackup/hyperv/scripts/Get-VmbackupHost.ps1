<#
.SYNOPSIS
    What vmbackup needs to know about a Hyper-V host before a backup.
.DESCRIPTION
    Reports the host's name, the state of the Hyper-V VSS writer (from
    `vssadmin list writers`), the volumes with their file system (persistent
    shadow copies need NTFS), and the shadow copies that vmbackup
    made and has not yet deleted (from its ledger, see New-VmbackupShadowCopy.ps1),
    each with the ids of its shadow copies that still exist (Existing).
    Read-only. Run it by hand as an administrator:  .\Get-VmbackupHost.ps1
.PARAMETER WorkDir
    vmbackup's working directory on the host (ledger, diskshadow scripts).
#>
param(
    [string]$WorkDir = "$env:ProgramData\vmbackup"
)
$ErrorActionPreference = 'Stop'

# The Hyper-V writer's well-known id; vssadmin prints one block per writer.
$hyperVWriterId = '{66841cd4-6ded-4f4b-8f17-fd23f8ddc3de}'
$writer = [ordered]@{ Name = 'Microsoft Hyper-V VSS Writer'; Id = $hyperVWriterId; State = 0; StateText = 'Unknown'; LastError = 'Not listed' }
$block = $null
foreach ($line in (vssadmin list writers)) {
    if ($line -match "Writer name: '(.+)'") { $block = $Matches[1] }
    elseif ($block -eq $writer.Name -and $line -match 'State: \[(\d+)\] (.+)') { $writer.State = [int]$Matches[1]; $writer.StateText = $Matches[2].Trim() }
    elseif ($block -eq $writer.Name -and $line -match 'Last error: (.+)') { $writer.LastError = $Matches[1].Trim() }
}

# Each run in the ledger, with which of its shadow copies still exist:
# Windows deletes the oldest when a volume's shadow storage is full.
$present = @(Get-CimInstance -ClassName Win32_ShadowCopy | ForEach-Object { $_.ID })
$ours = @()
$ledger = Join-Path $WorkDir 'ledger'
if (Test-Path $ledger) {
    foreach ($f in Get-ChildItem -Path $ledger -Filter '*.json') {
        $entry = Get-Content -Raw -Path $f.FullName | ConvertFrom-Json
        $entry | Add-Member -NotePropertyName Existing -NotePropertyValue @($entry.ShadowIds | Where-Object { $present -contains $_ })
        $ours += $entry
    }
}

[pscustomobject]@{
    ComputerName = $env:COMPUTERNAME
    Writer       = [pscustomobject]$writer
    Volumes      = @(Get-CimInstance -ClassName Win32_Volume | Where-Object { $_.DriveLetter } | ForEach-Object {
            [pscustomobject]@{ DriveLetter = $_.DriveLetter; DeviceID = $_.DeviceID; Capacity = $_.Capacity; FreeSpace = $_.FreeSpace; FileSystem = $_.FileSystem } })
    Runs         = @($ours)
}
