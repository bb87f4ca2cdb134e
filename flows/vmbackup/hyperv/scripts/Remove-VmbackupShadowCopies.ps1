<#
.SYNOPSIS
    Remove what crashed vmbackup runs left on this host: shadow copies, shares,
    mount points and the diskshadow processes holding them.
.DESCRIPTION
    Only runs recorded in vmbackup's ledger (<WorkDir>\ledger) and older than
    -OlderThanSeconds are touched, so a backup still running on this host
    keeps its shadow copy, and shadow copies made by anything else (another
    backup product, System Restore) are never deleted. Writers are not told
    BackupComplete for these runs.
    With -VMName, only runs whose ledger entry names that VM are removed: the
    next backup of a VM removes what an earlier (crashed) backup of it left,
    whatever its age, and leaves other VMs' runs alone.
    Run by hand:  .\Remove-VmbackupShadowCopies.ps1 -OlderThanSeconds 3600
                  .\Remove-VmbackupShadowCopies.ps1 -OlderThanSeconds 0 -VMName web01
#>
param(
    [int]$OlderThanSeconds = 3600,
    [string]$VMName = '',
    [string]$WorkDir = "$env:ProgramData\vmbackup"
)
$ErrorActionPreference = 'Stop'
$removed = @()
$ledgerDir = Join-Path $WorkDir 'ledger'
$cutoff = [DateTime]::UtcNow.AddSeconds(-$OlderThanSeconds)
foreach ($f in @(Get-ChildItem -Path $ledgerDir -Filter '*.json' -ErrorAction SilentlyContinue)) {
    $entry = Get-Content -Raw -Path $f.FullName | ConvertFrom-Json
    if ([DateTime]::Parse($entry.Created).ToUniversalTime() -gt $cutoff) { continue }
    if ($VMName -and -not (@($entry.VMs) -contains $VMName)) { continue }
    if ($entry.ProcessId) { Stop-Process -Id $entry.ProcessId -Force -ErrorAction SilentlyContinue }
    foreach ($share in $entry.Shares) { Remove-SmbShare -Name $share -Force -ErrorAction SilentlyContinue }
    # A run that crashed before recording its shadow ids left the set id in 'created'.
    $setId = if ($entry.SetId) { $entry.SetId } elseif (Test-Path "$($entry.RunDir)\created") { (Get-Content -Raw "$($entry.RunDir)\created").Trim() } else { $null }
    $ids = @()
    foreach ($copy in @(Get-CimInstance -ClassName Win32_ShadowCopy | Where-Object { $entry.ShadowIds -contains $_.ID -or ($setId -and $_.SetID -eq $setId) })) {
        Remove-CimInstance -InputObject $copy
        $ids += $copy.ID
    }
    Remove-Item -Recurse -Force -Path $entry.RunDir -ErrorAction SilentlyContinue
    Remove-Item -Force -Path $f.FullName
    $removed += [pscustomobject]@{ RunId = $entry.RunId; Created = $entry.Created; Deleted = $ids }
}
[pscustomobject]@{ Removed = $removed }
