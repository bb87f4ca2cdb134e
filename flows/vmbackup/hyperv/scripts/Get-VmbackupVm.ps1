<#
.SYNOPSIS
    One VM as vmbackup backs it up: state, Backup integration service, disks
    with their differencing chains, configuration files, volumes.
.DESCRIPTION
    Read-only. Disks are named by controller type, number and location
    (`scsi0:0`, `ide0:1`), as vmbackup names them. Each disk's chain lists the
    file the VM writes to first (an .avhdx when checkpoints exist) down to the
    base disk, from Get-VHD's ParentPath. Volumes are drive roots ('D:\') or,
    for a Cluster Shared Volume, its root ('C:\ClusterStorage\Volume1\').
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

# The Backup integration service is named 'VSS' since Windows Server 2016 and
# 'Backup (volume snapshot)' before; match either.
# A CSV is a folder on the system drive but a volume of its own for VSS.
function Get-VolumeRoot([string]$Path) {
    if ($Path -match '^([A-Za-z]:\\ClusterStorage\\[^\\]+\\)') { return $Matches[1] }
    return [IO.Path]::GetPathRoot($Path)
}

$backup = Get-VMIntegrationService -VM $vm | Where-Object { $_.Name -eq 'VSS' -or $_.Name -like 'Backup*' } | Select-Object -First 1

$volumes = @{}
$disks = foreach ($d in Get-VMHardDiskDrive -VM $vm) {
    $prefix = @{ 0 = 'ide'; 1 = 'scsi' }[[int]$d.ControllerType]
    $chain = @()
    $path = $d.Path
    while ($path) {
        $vhd = Get-VHD -Path $path
        $chain += [pscustomobject]@{ Path = $vhd.Path; VhdFormat = [int]$vhd.VhdFormat; VhdType = [int]$vhd.VhdType; Size = $vhd.Size; FileSize = $vhd.FileSize; ParentPath = $vhd.ParentPath }
        $volumes[(Get-VolumeRoot $vhd.Path)] = $true
        $path = $vhd.ParentPath
    }
    [pscustomobject]@{
        Name               = '{0}{1}:{2}' -f $prefix, $d.ControllerNumber, $d.ControllerLocation
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
    Backup                = if ($backup) { [pscustomobject]@{ Name = $backup.Name; Enabled = [bool]$backup.Enabled; PrimaryOperationalStatus = [int]$backup.PrimaryOperationalStatus } } else { $null }
    ConfigurationLocation = $vm.ConfigurationLocation
    ConfigFiles           = $config
    Disks                 = @($disks)
    Volumes               = @($volumes.Keys | Sort-Object)
}
