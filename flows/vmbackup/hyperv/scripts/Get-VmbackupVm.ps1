<#
.SYNOPSIS
    One VM as vmbackup backs it up: state, Backup integration service, disks
    with their differencing chains, configuration files, volumes, and what a
    restore rebuilds it from (generation, processors, memory, network adapters).
.DESCRIPTION
    Read-only. Disks are named by controller type, number and location
    (`scsi0:0`, `ide0:1`), as vmbackup names them. Each disk's chain lists the
    file the VM writes to first (an .avhdx when checkpoints exist) down to the
    base disk, from Get-VHD's ParentPath. Volumes are drive roots ('D:\') or,
    for a Cluster Shared Volume, its root ('C:\ClusterStorage\Volume1\').
    Disks no shadow copy of this host's volumes can hold are listed under
    SkippedDisks with the reason, not under Disks, and their places are not in
    Volumes: a pass-through disk (a physical disk of the host: no file) and a
    virtual disk file on an SMB share (Hyper-V over SMB). One such disk never
    fails the script.
    The Backup integration service is found by its Id, which ends in the fixed
    GUID 5CED1297-4598-4915-A5FC-AD21BB4D02A4 on every host, not by its name,
    which Windows localizes ('VSS', 'Backup (volume snapshot)', or a German
    host's own name).
    Run by hand:  .\Get-VmbackupVm.ps1 -VMName web01
.PARAMETER VMName
    The VM's name as Get-VM shows it.
#>
param(
    [Parameter(Mandatory = $true)][string]$VMName
)
$ErrorActionPreference = 'Stop'

$vm = Get-VM -Name $VMName -ErrorAction SilentlyContinue
if (-not $vm) { throw "VmNotFound: no VM named '$VMName' on $env:COMPUTERNAME" }

# The Backup (VSS) integration service's Id is 'Microsoft:<VMId>\<GUID>'; its
# name is localized, the GUID is not.
$backupServiceGuid = '5CED1297-4598-4915-A5FC-AD21BB4D02A4'
# A CSV is a folder on the system drive but a volume of its own for VSS.
function Get-VolumeRoot([string]$Path) {
    if ($Path -match '^([A-Za-z]:\\ClusterStorage\\[^\\]+\\)') { return $Matches[1] }
    return [IO.Path]::GetPathRoot($Path)
}

$backup = Get-VMIntegrationService -VM $vm | Where-Object { ([string]$_.Id).ToUpper().EndsWith('\' + $backupServiceGuid) } | Select-Object -First 1

$volumes = @{}
$skipped = @()
$disks = foreach ($d in Get-VMHardDiskDrive -VM $vm) {
    $prefix = @{ 0 = 'ide'; 1 = 'scsi' }[[int]$d.ControllerType]
    $name = '{0}{1}:{2}' -f $prefix, $d.ControllerNumber, $d.ControllerLocation
    if ($null -ne $d.DiskNumber) {
        $skipped += [pscustomobject]@{ Name = $name; Path = $d.Path; DiskNumber = $d.DiskNumber
            Reason = "a pass-through disk (physical disk $($d.DiskNumber) of the host): it has no virtual disk file, so no shadow copy of the host's volumes holds it; back it up from inside the guest" }
        continue
    }
    if ($d.Path -like '\\*') {
        $skipped += [pscustomobject]@{ Name = $name; Path = $d.Path; DiskNumber = $null
            Reason = "its file $($d.Path) is on an SMB share: a shadow copy of the host's volumes does not hold it (a share's shadow copy is made on the file server, by its File Server VSS Agent Service), so the agent has no point-in-time copy to read" }
        continue
    }
    $chain = @()
    $path = $d.Path
    while ($path) {
        $vhd = Get-VHD -Path $path
        $chain += [pscustomobject]@{ Path = $vhd.Path; VhdFormat = [int]$vhd.VhdFormat; VhdType = [int]$vhd.VhdType; Size = $vhd.Size; FileSize = $vhd.FileSize; ParentPath = $vhd.ParentPath }
        $volumes[(Get-VolumeRoot $vhd.Path)] = $true
        $path = $vhd.ParentPath
    }
    [pscustomobject]@{
        Name               = $name
        ControllerType     = [int]$d.ControllerType
        ControllerNumber   = $d.ControllerNumber
        ControllerLocation = $d.ControllerLocation
        Path               = $d.Path
        Chain              = $chain
    }
}
$config = @(Get-ChildItem -Path (Join-Path $vm.ConfigurationLocation 'Virtual Machines') -Recurse -File -ErrorAction SilentlyContinue |
        Where-Object { $_.Name -like "$($vm.Id)*" } | ForEach-Object { $_.FullName })
$volumes[(Get-VolumeRoot $vm.ConfigurationLocation)] = $true

[pscustomobject]@{
    Name                  = $vm.Name
    Id                    = [string]$vm.Id
    State                 = [int]$vm.State
    Backup                = if ($backup) { [pscustomobject]@{ Name = $backup.Name; Id = [string]$backup.Id; Enabled = [bool]$backup.Enabled; PrimaryOperationalStatus = [int]$backup.PrimaryOperationalStatus } } else { $null }
    ConfigurationLocation = $vm.ConfigurationLocation
    Generation            = [int]$vm.Generation
    Version               = [string]$vm.Version
    ProcessorCount        = [int]$vm.ProcessorCount
    MemoryStartup         = [int64]$vm.MemoryStartup
    NetworkAdapters       = @(Get-VMNetworkAdapter -VM $vm | ForEach-Object { [pscustomobject]@{ Name = $_.Name; SwitchName = $_.SwitchName; MacAddress = $_.MacAddress } })
    ConfigFiles           = $config
    Disks                 = @($disks)
    SkippedDisks          = @($skipped)
    Volumes               = @($volumes.Keys | Sort-Object)
}
