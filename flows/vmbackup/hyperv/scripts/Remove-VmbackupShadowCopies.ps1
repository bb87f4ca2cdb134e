<#
.SYNOPSIS
    Remove what crashed vmbackup runs left on this host: the diskshadow
    processes holding their VSS backups open, shares, mount points and shadow
    copies.
.DESCRIPTION
    Only runs recorded in vmbackup's ledger (<WorkDir>\ledger) and older than
    -OlderThanSeconds are touched, so a backup still running on this host
    keeps its shadow copy, and shadow copies made by anything else (another
    backup product, System Restore) are never deleted.
    With -VMName, only runs whose ledger entry names that VM are removed: the
    next backup of a VM removes what an earlier (crashed) backup of it left,
    whatever its age, and leaves other VMs' runs alone.
    For each run, first the VSS backup is ended: the run's 'abort' file makes
    wait.cmd fail, so diskshadow quits before 'end backup' (writers are not
    told BackupComplete); a diskshadow still running after
    -StopTimeoutSeconds is stopped. Then the copies are deleted. Without this
    a crashed run's diskshadow would hold the backup open for HoldSeconds.
    Run by hand:  .\Remove-VmbackupShadowCopies.ps1 -OlderThanSeconds 3600
                  .\Remove-VmbackupShadowCopies.ps1 -OlderThanSeconds 0 -VMName web01
.PARAMETER StopTimeoutSeconds
    How long to wait for diskshadow to quit on 'abort' before stopping it.
#>
param(
    [int]$OlderThanSeconds = 3600,
    [string]$VMName = '',
    [int]$StopTimeoutSeconds = 30,
    [string]$WorkDir = "$env:ProgramData\vmbackup"
)
$ErrorActionPreference = 'Stop'
$removed = @()
$ledgerDir = Join-Path $WorkDir 'ledger'
$cutoff = [DateTime]::UtcNow.AddSeconds(-$OlderThanSeconds)
foreach ($f in @(Get-ChildItem -Path $ledgerDir -Filter '*.json' -ErrorAction SilentlyContinue)) {
    $entry = Get-Content -Raw -Path $f.FullName | ConvertFrom-Json
    $created = [DateTime]::Parse($entry.Created).ToUniversalTime()
    if ($created -gt $cutoff) { continue }
    if ($VMName -and -not (@($entry.VMs) -contains $VMName)) { continue }
    $run = $entry.RunDir

    # End the VSS backup before deleting anything: ask diskshadow to quit, then stop it.
    if (Test-Path $run) { Set-Content -Path "$run\abort" -Value ([DateTime]::UtcNow.ToString('o')) }
    # diskshadow's own id (a run that crashed before recording it left it in diskshadow.pid);
    # a process of that id that is not diskshadow, or started before the run, is not ours.
    $dsId = if ($entry.ProcessId) { $entry.ProcessId } elseif (Test-Path "$run\diskshadow.pid") { [int](Get-Content -Raw "$run\diskshadow.pid").Trim() } else { $null }
    $ds = if ($dsId) { Get-Process -Id $dsId -ErrorAction SilentlyContinue | Where-Object { $_.ProcessName -eq 'diskshadow' -and $_.StartTime.ToUniversalTime() -ge $created.AddSeconds(-5) } }
    if ($ds -and -not $ds.WaitForExit($StopTimeoutSeconds * 1000)) { Stop-Process -InputObject $ds -Force }

    foreach ($share in $entry.Shares) { Remove-SmbShare -Name $share -Force -ErrorAction SilentlyContinue }
    # A run that crashed before recording its shadow ids left the set id in 'created'.
    $setId = if ($entry.SetId) { $entry.SetId } elseif (Test-Path "$run\created") { (Get-Content -Raw "$run\created").Trim() } else { $null }
    $ids = @()
    foreach ($copy in @(Get-CimInstance -ClassName Win32_ShadowCopy | Where-Object { $entry.ShadowIds -contains $_.ID -or ($setId -and $_.SetID -eq $setId) })) {
        Remove-CimInstance -InputObject $copy
        $ids += $copy.ID
    }
    Remove-Item -Recurse -Force -Path $run -ErrorAction SilentlyContinue
    Remove-Item -Force -Path $f.FullName
    $removed += [pscustomobject]@{ RunId = $entry.RunId; Created = $entry.Created; Deleted = $ids }
}
[pscustomobject]@{ Removed = $removed }
