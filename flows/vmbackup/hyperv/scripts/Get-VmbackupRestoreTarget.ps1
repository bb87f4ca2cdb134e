<#
.SYNOPSIS
    What a restore needs to know of its target before it makes anything: a
    VM of that name, the target folder, its volume's free space, the host's
    virtual switches.
.DESCRIPTION
    Read-only. Vm is the VM named -Name (Hyper-V compares names without
    regard to case), with its state and disks, or null. PathExists and
    ParentExists say whether the folder and its parent exist; FreeBytes is
    the free space of the volume holding -Path (Win32_Volume.FreeSpace).
    Switches are the names of Get-VMSwitch.
    Run by hand:  .\Get-VmbackupRestoreTarget.ps1 -Name web01-restored -Path 'D:\Hyper-V\web01-restored'
.PARAMETER Name
    The name the restored VM will have.
.PARAMETER Path
    The folder the restore will create (it must not exist unless in place).
#>
param(
    [Parameter(Mandatory = $true)][string]$Name,
    [string]$Path = ''
)
$ErrorActionPreference = 'Stop'

$vm = Get-VM -Name $Name -ErrorAction SilentlyContinue | Select-Object -First 1
$vmOut = $null
if ($vm) {
    $vmOut = [pscustomobject]@{
        Name                  = $vm.Name
        Id                    = [string]$vm.Id
        State                 = [int]$vm.State
        ConfigurationLocation = $vm.ConfigurationLocation
        Disks                 = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object {
                [pscustomobject]@{ Name = ('{0}{1}:{2}' -f @{ 0 = 'ide'; 1 = 'scsi' }[[int]$_.ControllerType], $_.ControllerNumber, $_.ControllerLocation); Path = $_.Path }
            })
    }
}
$free = $null
$parentExists = $false
if ($Path) {
    $parent = Split-Path -Path $Path -Parent
    $parentExists = [bool]($parent -and (Test-Path -LiteralPath $parent -PathType Container))
    $root = [IO.Path]::GetPathRoot($Path)
    $vol = Get-CimInstance -ClassName Win32_Volume | Where-Object { $_.Name -eq $root } | Select-Object -First 1
    if ($vol) { $free = [int64]$vol.FreeSpace }
}
[pscustomobject]@{
    ComputerName       = $env:COMPUTERNAME
    Vm                 = $vmOut
    Path               = $Path
    PathExists         = [bool]($Path -and (Test-Path -LiteralPath $Path))
    ParentExists       = $parentExists
    FreeBytes          = $free
    Switches           = @(Get-VMSwitch | ForEach-Object { $_.Name })
    VirtualMachinePath = (Get-VMHost).VirtualMachinePath
}
