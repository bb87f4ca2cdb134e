<#
.SYNOPSIS
    Create a persistent VSS shadow copy set of the volumes that hold some VMs'
    files, with the Hyper-V VSS writer included, and keep the backup open until
    Complete-VmbackupShadowCopy.ps1 says the data is durable.
.DESCRIPTION
    vmbackup is the VSS requestor through diskshadow.exe (Windows Server): this
    script writes a diskshadow script and starts it outside the WinRM shell
    (Win32_Process.Create, so it survives the end of this command):

        set context persistent              # the copy outlives diskshadow; it can be exposed
        set metadata <run>\backup.cab
        writer verify {66841cd4-...}        # Hyper-V writer (or 'writer exclude' for crash consistency)
        begin backup                        # a full backup (VSS_BT_FULL), not a copy backup
        add volume D: alias vmbk_1          # one per volume
        create                              # the guests' own VSS backups run here (see below)
        expose %vmbk_1% <run>\mnt\1         # a local mount point per volume
        exec <run>\wait.cmd                 # blocks until the data is durable (or abort/timeout)
        end backup                          # BackupComplete to the HOST's writers

    The exec step holds the backup open while vmbackup reads the files from the
    mount points (or an SMB share of them). If it ends with an error (abort or
    timeout) diskshadow stops before 'end backup', so writers are never told the
    backup completed.

    Log truncation (docs/hyperv.md, "Log truncation"): each quiesced guest
    runs its whole VSS backup, its own BackupComplete included, inside
    'create' (Microsoft: "All VSS events on the child virtual machine occur
    during the host operating system processing of the PrepareForSnapshot
    event"), so guest applications may truncate logs before our data is
    durable. Only the host's writers wait for 'end backup'.

    The shadow copies are persistent either way: they are
    deleted by Complete-VmbackupShadowCopy.ps1 or, after a crash, by
    Remove-VmbackupShadowCopies.ps1, which only touch copies recorded in
    vmbackup's ledger (<WorkDir>\ledger\<RunId>.json), which also names the
    run's VMs (so the next backup of a VM removes what a crashed one left)
    and diskshadow's own process id (ProcessId; RunnerProcessId is the
    powershell.exe of run.ps1 that started it).

    Consistency: 'application' when the Hyper-V writer is included: every VM
    asked for is running with its Backup (VSS) integration service enabled and
    answering, so is every OTHER running VM with files on these volumes (the
    writer takes part for all of them and would put one without a working
    Backup service into a saved state), and the writer is stable. Otherwise
    'crash' (the writer excluded) when -Quiesce is 'preferred' (the reasons are
    returned), or an error when it is 'required'. -Quiesce off always excludes
    the writer.

    Several VMs (the VMs of this host whose files share volumes) go into ONE
    set: the writer freezes each guest once for it. VMs lists each VM asked for
    with its own Consistency and Reasons; a VM that is off does not keep the
    writer from the running ones ('X is not running' is then its own reason).

    VSS creates one shadow copy set at a time per host: while another is being
    created, diskshadow's 'create' fails with VSS_E_SNAPSHOT_SET_IN_PROGRESS
    (0x80042316). The script then removes what it wrote (nothing else exists)
    and fails with 'ShadowSetInProgress: ...'; the caller waits and tries again.
    Run by hand:  .\New-VmbackupShadowCopy.ps1 -RunId test1 -VMName web01 -Volumes D:\
.PARAMETER RunId
    Names this backup's files, ledger entry, mount points and shares.
.PARAMETER VMName
    The VMs being backed up (their Backup service, and that of every other
    running VM on the volumes, decides the consistency).
.PARAMETER Volumes
    Volume roots holding the VMs' files, as Get-VmbackupVm.ps1 lists them
    ('D:\'). Each must be NTFS: persistent shadow copies can be made only for
    NTFS volumes, so ReFS and CSVFS are refused before anything is made.
.PARAMETER Quiesce
    required | preferred | off.
.PARAMETER ShareTo
    If set, each mount point is also shared read-only to this account as
    \\<host>\vmbk-<RunId>-<n>$ (for an agent that is not the host).
.PARAMETER HoldSeconds
    How long diskshadow keeps the backup open waiting for completion.
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^[A-Za-z0-9-]{1,64}$')][string]$RunId,
    [Parameter(Mandatory = $true)][string[]]$VMName,
    [Parameter(Mandatory = $true)][string[]]$Volumes,
    [ValidateSet('required', 'preferred', 'off')][string]$Quiesce = 'preferred',
    [string]$ShareTo = '',
    [int]$HoldSeconds = 86400,
    [int]$CreateTimeoutSeconds = 600,
    [string]$WorkDir = "$env:ProgramData\vmbackup"
)
$ErrorActionPreference = 'Stop'
$hyperVWriter = '{66841cd4-6ded-4f4b-8f17-fd23f8ddc3de}'

# The Backup integration service, by the fixed GUID that ends its Id (its name
# is localized). '' when it is on and answering, else why not.
function Get-BackupServiceProblem($Vm) {
    $svc = Get-VMIntegrationService -VM $Vm | Where-Object { ([string]$_.Id).ToUpper().EndsWith('\5CED1297-4598-4915-A5FC-AD21BB4D02A4') } | Select-Object -First 1
    if (-not $svc -or -not $svc.Enabled) { return 'its Backup integration service is off' }
    if ([int]$svc.PrimaryOperationalStatus -ne 2) { return 'its Backup integration service does not answer' }
    return ''
}
# As in Get-VmbackupVm.ps1: a CSV is a volume of its own for VSS.
function Get-VolumeRoot([string]$Path) {
    if ($Path -match '^([A-Za-z]:\\ClusterStorage\\[^\\]+\\)') { return $Matches[1] }
    return [IO.Path]::GetPathRoot($Path)
}
$volumeRoots = @($Volumes | ForEach-Object { $_.TrimEnd('\') + '\' })

# --- persistent shadow copies can be made only for NTFS volumes ---
# (VSS documentation, "Shadow Copy Context Configurations"): refuse ReFS and
# CSVFS here, in one line, rather than let diskshadow fail at 'create'.
$allVolumes = @(Get-CimInstance -ClassName Win32_Volume)
foreach ($root in $volumeRoots) {
    $volume = $allVolumes | Where-Object { $_.Name -eq $root } | Select-Object -First 1
    if (-not $volume) { throw "ShadowCopyFailed: the volume $root does not exist on $env:COMPUTERNAME" }
    if ($volume.FileSystem -ne 'NTFS') {
        $what = if ($volume.FileSystem -eq 'CSVFS') { 'a Cluster Shared Volume (CSVFS)' } else { $volume.FileSystem }
        throw ("ShadowCopyFailed: volume $root is ${what}: vmbackup makes persistent shadow copies (diskshadow " +
            "'set context persistent'), which VSS makes only for NTFS volumes; to back up this VM, move its files " +
            "to an NTFS volume of the host (Move-VMStorage), or use a product that backs up through Hyper-V's " +
            "WMI backup (recovery checkpoints with RCT, Windows Server 2016 and later)")
    }
}

# --- which consistency can we get? ---
$reasons = @()
$perVm = [ordered]@{}
$offReasons = @()
if ($Quiesce -eq 'off') { $reasons += 'quiesce is off' }
else {
    foreach ($name in $VMName) {
        $vm = Get-VM -Name $name -ErrorAction SilentlyContinue
        if (-not $vm) { throw "VmNotFound: no VM named '$name' on $env:COMPUTERNAME" }
        if ([int]$vm.State -ne 2) { $perVm[$name] = @("$name is not running"); $offReasons += "$name is not running"; continue }
        $problem = Get-BackupServiceProblem $vm
        if ($problem -eq 'its Backup integration service is off') { $reasons += "$name has its Backup integration service off" }
        elseif ($problem) { $reasons += "$name's Backup integration service does not answer" }
    }
    # VMs that are off take part without being frozen: they keep the writer
    # from the others only when no VM asked for runs (a set of one VM that is off).
    if ($offReasons.Count -eq $VMName.Count) { $reasons += $offReasons }
    # The Hyper-V writer backs up EVERY VM with files on the added volumes, not
    # only ours; a running VM that cannot take its own (child) VSS snapshot is
    # put into a saved state during 'create', and one VM failing fails the
    # whole set ("Backing up and restoring virtual machines", Hyper-V WMI docs).
    # So any such VM means: no writer (preferred) or no backup (required).
    foreach ($other in @(Get-VM | Sort-Object -Property Name)) {
        if ($VMName -contains $other.Name -or [int]$other.State -ne 2) { continue }
        $paths = @($other.ConfigurationLocation, $other.SnapshotFileLocation) + @(Get-VMHardDiskDrive -VM $other | ForEach-Object { $_.Path })
        $shared = @($paths | Where-Object { $_ } | ForEach-Object { Get-VolumeRoot $_ } | Where-Object { $volumeRoots -contains $_ } | Sort-Object -Unique)
        if ($shared.Count -eq 0) { continue }
        $problem = Get-BackupServiceProblem $other
        if ($problem) { $reasons += "$($other.Name) is also on $($shared -join ', ') and would be put into a saved state: $problem" }
    }
    $state = $null
    $block = $null
    foreach ($line in (vssadmin list writers)) {
        if ($line -match "Writer name: '(.+)'") { $block = $Matches[1] }
        elseif ($block -eq 'Microsoft Hyper-V VSS Writer' -and $line -match 'State: \[(\d+)\]') { $state = [int]$Matches[1] }
        elseif ($block -eq 'Microsoft Hyper-V VSS Writer' -and $line -match 'Last error: (.+)' -and $Matches[1].Trim() -ne 'No error') { $reasons += "the Hyper-V VSS writer failed: $($Matches[1].Trim())" }
    }
    if ($state -ne 1) { $reasons += "the Hyper-V VSS writer is not stable (state $state)" }
}
$writerIn = $reasons.Count -eq 0
$vmsOut = @(foreach ($name in $VMName) {
        $own = if ($perVm.Contains($name)) { @($perVm[$name]) } elseif ($writerIn) { @() } else { @($reasons) }
        $c = if ($writerIn -and -not $perVm.Contains($name)) { 'application' } else { 'crash' }
        [pscustomobject]@{ Name = $name; Consistency = $c; Reasons = @($own) }
    })
$consistency = if ($writerIn -and $offReasons.Count -eq 0) { 'application' } else { 'crash' }
if (-not $writerIn -and $Quiesce -eq 'required') { throw "QuiesceUnavailable: $($reasons -join '; ')" }
if ($writerIn) { $reasons += $offReasons }

# --- the run's files and the ledger entry (written before anything exists) ---
$run = Join-Path $WorkDir "runs\$RunId"
$ledgerDir = Join-Path $WorkDir 'ledger'
New-Item -ItemType Directory -Force -Path $run, $ledgerDir, (Join-Path $run 'mnt') | Out-Null
$ledgerFile = Join-Path $ledgerDir "$RunId.json"
$entry = [ordered]@{ RunId = $RunId; Created = [DateTime]::UtcNow.ToString('o'); VMs = @($VMName); ProcessId = $null; RunnerProcessId = $null; SetId = $null; ShadowIds = @(); Shares = @(); RunDir = $run }
$entry | ConvertTo-Json | Set-Content -Path $ledgerFile

$lines = @('set context persistent', "set metadata `"$run\backup.cab`"", 'set verbose on')
$lines += if ($consistency -eq 'application') { "writer verify $hyperVWriter" } else { "writer exclude $hyperVWriter" }
$lines += 'begin backup'
for ($i = 0; $i -lt $Volumes.Count; $i++) { $lines += "add volume $($Volumes[$i].TrimEnd('\')) alias vmbk_$i" }
$lines += 'create'
for ($i = 0; $i -lt $Volumes.Count; $i++) {
    New-Item -ItemType Directory -Force -Path "$run\mnt\$i" | Out-Null
    $lines += "expose %vmbk_$i% `"$run\mnt\$i`""
}
$lines += "exec `"$run\wait.cmd`"", 'end backup'
$lines | Set-Content -Encoding ASCII -Path "$run\backup.dsh"

# wait.cmd runs inside diskshadow after 'create': it records the shadow set id
# (diskshadow sets VSS_SHADOW_SET) and waits for 'durable' or 'abort' (or the
# run's files being gone, after a cleanup).
@"
@echo off
echo %VSS_SHADOW_SET%> "$run\created"
powershell.exe -NoProfile -NonInteractive -Command "`$t = [DateTime]::UtcNow.AddSeconds($HoldSeconds); while ((Test-Path '$run\backup.dsh') -and -not (Test-Path '$run\durable') -and -not (Test-Path '$run\abort') -and [DateTime]::UtcNow -lt `$t) { Start-Sleep -Seconds 1 }; if (Test-Path '$run\durable') { exit 0 } else { exit 1 }"
"@ | Set-Content -Encoding ASCII -Path "$run\wait.cmd"
# run.ps1 starts diskshadow and records ITS process id: stopping run.ps1's
# powershell.exe would not stop diskshadow (Windows does not stop children),
# which would then hold the VSS backup open for up to -HoldSeconds.
@"
`$ds = Start-Process -FilePath diskshadow.exe -ArgumentList '/s "$run\backup.dsh"' -RedirectStandardOutput '$run\diskshadow.log' -NoNewWindow -PassThru
`$null = `$ds.Handle  # keeps ExitCode readable once it has ended
Set-Content -Path '$run\diskshadow.pid' -Value `$ds.Id
`$ds.WaitForExit()
Set-Content -Path '$run\exitcode' -Value `$ds.ExitCode
"@ | Set-Content -Path "$run\run.ps1"

$proc = Invoke-CimMethod -ClassName Win32_Process -MethodName Create -Arguments @{ CommandLine = "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$run\run.ps1`"" }
if ($proc.ReturnValue -ne 0) { throw "ShadowCopyFailed: could not start diskshadow (Win32_Process.Create returned $($proc.ReturnValue))" }
$entry.RunnerProcessId = $proc.ProcessId
$entry | ConvertTo-Json | Set-Content -Path $ledgerFile

$deadline = [DateTime]::UtcNow.AddSeconds($CreateTimeoutSeconds)
while (-not (Test-Path "$run\created")) {
    if (-not $entry.ProcessId -and (Test-Path "$run\diskshadow.pid")) {
        $entry.ProcessId = [int](Get-Content -Raw "$run\diskshadow.pid").Trim()
        $entry | ConvertTo-Json | Set-Content -Path $ledgerFile
    }
    if (Test-Path "$run\exitcode") {
        $log = (Get-Content -Raw "$run\diskshadow.log") -replace '\s+', ' '
        if ($log -match '0x80042316|VSS_E_SNAPSHOT_SET_IN_PROGRESS') {
            # Another requester's set is being created: nothing of ours exists; leave no trace.
            Remove-Item -Recurse -Force -Path $run
            Remove-Item -Force -Path $ledgerFile
            throw ("ShadowSetInProgress: another shadow copy set is being created on $env:COMPUTERNAME " +
                "(VSS_E_SNAPSHOT_SET_IN_PROGRESS, 0x80042316): VSS creates one set at a time per host; nothing was made, try again")
        }
        throw "ShadowCopyFailed: diskshadow ended before the shadow copy existed: $log"
    }
    if ([DateTime]::UtcNow -gt $deadline) { throw "ShadowCopyFailed: no shadow copy after $CreateTimeoutSeconds s" }
    Start-Sleep -Milliseconds 500
}
if (-not $entry.ProcessId) { $entry.ProcessId = [int](Get-Content -Raw "$run\diskshadow.pid").Trim() }
$setId = (Get-Content -Raw "$run\created").Trim()
$copies = @(Get-CimInstance -ClassName Win32_ShadowCopy | Where-Object { $_.SetID -eq $setId })
$entry.SetId = $setId
$entry.ShadowIds = @($copies | ForEach-Object { $_.ID })

$out = @()
for ($i = 0; $i -lt $Volumes.Count; $i++) {
    $volumeName = (Get-CimInstance -ClassName Win32_Volume | Where-Object { $_.Name -eq $Volumes[$i] }).DeviceID
    $copy = $copies | Where-Object { $_.VolumeName -eq $volumeName } | Select-Object -First 1
    $share = $null
    if ($ShareTo) {
        $shareName = "vmbk-$RunId-$i`$"
        New-SmbShare -Name $shareName -Path "$run\mnt\$i" -ReadAccess $ShareTo | Out-Null
        $entry.Shares += $shareName
        $share = "\\$env:COMPUTERNAME\$shareName"
    }
    $out += [pscustomobject]@{ Volume = $Volumes[$i]; ShadowId = $copy.ID; DeviceObject = $copy.DeviceObject; ExposedPath = "$run\mnt\$i"; SharePath = $share }
}
$entry | ConvertTo-Json | Set-Content -Path $ledgerFile

[pscustomobject]@{ RunId = $RunId; SetId = $setId; Consistency = $consistency; Reasons = @($reasons); VMs = $vmsOut; ShadowCopies = $out }
