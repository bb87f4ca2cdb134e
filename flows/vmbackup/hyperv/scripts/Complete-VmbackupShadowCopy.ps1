<#
.SYNOPSIS
    End a backup started by New-VmbackupShadowCopy.ps1 and delete its shadow copies.
.DESCRIPTION
    With -Succeeded (the data is durable in the repository) diskshadow is let go
    on to 'end backup', which tells the host's writers BackupComplete (the
    guests' own VSS backups already ran inside 'create': their applications
    may have truncated logs then; see docs/hyperv.md). Without it diskshadow
    is aborted before 'end backup' and the writers are never told the backup
    completed.
    If diskshadow has not ended after -TimeoutSeconds it is stopped (it is
    diskshadow's own process id that the ledger holds), so it cannot hold the
    backup open. Then, on every path, the shares, mount points and shadow copies recorded in
    the ledger are removed, and the ledger entry with them. Shadow copies that
    are not in vmbackup's ledger are never touched.
    Run by hand:  .\Complete-VmbackupShadowCopy.ps1 -RunId test1 -Succeeded $true
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^[A-Za-z0-9-]{1,64}$')][string]$RunId,
    [bool]$Succeeded = $false,
    [int]$TimeoutSeconds = 300,
    [string]$WorkDir = "$env:ProgramData\vmbackup"
)
$ErrorActionPreference = 'Stop'
$ledgerFile = Join-Path $WorkDir "ledger\$RunId.json"
if (-not (Test-Path $ledgerFile)) { throw "RunNotFound: no backup run '$RunId' in $WorkDir\ledger" }
$entry = Get-Content -Raw -Path $ledgerFile | ConvertFrom-Json
$run = $entry.RunDir

# 'durable' lets diskshadow go on to 'end backup'; 'abort' makes it quit before.
Set-Content -Path (Join-Path $run $(if ($Succeeded) { 'durable' } else { 'abort' })) -Value ([DateTime]::UtcNow.ToString('o'))
# ProcessId is diskshadow's own (see New-VmbackupShadowCopy.ps1; a run that
# crashed before recording it left it in diskshadow.pid); a process of that id
# that is not diskshadow, or started before the run, is not ours.
$created = [DateTime]::Parse($entry.Created).ToUniversalTime()
$dsId = if ($entry.ProcessId) { $entry.ProcessId } elseif (Test-Path "$run\diskshadow.pid") { [int](Get-Content -Raw "$run\diskshadow.pid").Trim() } else { $null }
$ds = if ($dsId) { Get-Process -Id $dsId -ErrorAction SilentlyContinue | Where-Object { $_.ProcessName -eq 'diskshadow' -and $_.StartTime.ToUniversalTime() -ge $created.AddSeconds(-5) } }
$deadline = [DateTime]::UtcNow.AddSeconds($TimeoutSeconds)
while (-not (Test-Path "$run\exitcode") -and $ds -and -not $ds.HasExited -and [DateTime]::UtcNow -lt $deadline) {
    Start-Sleep -Milliseconds 500
}
# Still running: stop diskshadow itself, so it does not hold the backup open (no 'end backup').
if ($ds -and -not $ds.HasExited) { Stop-Process -InputObject $ds -Force; $ds.WaitForExit(10000) | Out-Null }
# run.ps1 writes diskshadow's exit code, then exits.
$runner = if ($entry.RunnerProcessId) { Get-Process -Id $entry.RunnerProcessId -ErrorAction SilentlyContinue | Where-Object { $_.ProcessName -eq 'powershell' } }
if ($runner) { $runner.WaitForExit(10000) | Out-Null }
$exit = if (Test-Path "$run\exitcode") { [int](Get-Content -Raw "$run\exitcode") } else { -1 }
$complete = $Succeeded -and $exit -eq 0

foreach ($share in $entry.Shares) { Remove-SmbShare -Name $share -Force -ErrorAction SilentlyContinue }
$setId = if ($entry.SetId) { $entry.SetId } elseif (Test-Path "$run\created") { (Get-Content -Raw "$run\created").Trim() } else { $null }
$deleted = @()
foreach ($copy in @(Get-CimInstance -ClassName Win32_ShadowCopy | Where-Object { $entry.ShadowIds -contains $_.ID -or ($setId -and $_.SetID -eq $setId) })) {
    Remove-CimInstance -InputObject $copy
    $deleted += $copy.ID
}
Remove-Item -Recurse -Force -Path $run -ErrorAction SilentlyContinue
Remove-Item -Force -Path $ledgerFile

[pscustomobject]@{ RunId = $RunId; BackupComplete = $complete; Deleted = $deleted }
