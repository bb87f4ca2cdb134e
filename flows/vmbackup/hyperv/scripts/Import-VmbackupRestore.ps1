<#
.SYNOPSIS
    Make the restored VM from its staged configuration and disks: Compare-VM,
    each incompatibility resolved, Import-VM -Copy -GenerateNewId; or, when the
    configuration cannot be imported, rebuilt from its description.
.DESCRIPTION
    -ConfigFile is the staged .vmcx. Compare-VM -Copy -GenerateNewId reports
    what this host cannot take as it is; this script resolves each report:
    a network adapter whose switch the host lacks (message 33012) is
    connected to the switch -NetworkMap names for it, else disconnected; each
    hard drive of the configuration is pointed at the staged VHDX of the same
    place (ide0:0, scsi0:1), a drive the point does not hold is removed. Then
    Import-VM -CompatibilityReport copies the disks into '<Path>\Virtual Hard
    Disks' and registers the VM under a new Id in -Path. When Compare-VM
    cannot read the configuration (a configuration version this host does not
    run, a damaged or missing file), the VM is made with New-VM from
    -Description (generation, processors, memory, adapters) and the staged
    disks are copied and attached (Add-VMHardDiskDrive). With -InPlace the VM
    -Name exists and is off: each staged VHDX is moved into its folder's
    'Virtual Hard Disks' (a rename on one volume) and the drive of its place
    pointed at it (Set-VMHardDiskDrive); the files the drives used are kept.
    Start-VM with -PowerOn.
    The restore's entry must exist (New-VmbackupRestore.ps1).
.PARAMETER Disks
    [{ Name = 'sata0:0'; Place = 'scsi0:1'; Path = '<staged .vhdx>' }, ...]: the
    point's disk name and where it goes on this host (Place; Name if none).
.PARAMETER NetworkMap
    { '<switch in the configuration>' = '<switch of this host>' }
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^[A-Za-z0-9-]{1,64}$')][string]$RestoreId,
    [Parameter(Mandatory = $true)][string]$Name,
    [Parameter(Mandatory = $true)][object[]]$Disks,
    [Parameter(Mandatory = $true)][object]$Description,
    [string]$ConfigFile = '',
    [object]$NetworkMap = $null,
    [bool]$PowerOn = $false,
    [bool]$InPlace = $false,
    [string]$WorkDir = 'C:\ProgramData\vmbackup'
)
$ErrorActionPreference = 'Stop'

$entryFile = Join-Path (Join-Path $WorkDir 'restores') "$RestoreId.json"
if (-not (Test-Path -LiteralPath $entryFile)) { throw "RestoreNotFound: no restore '$RestoreId' in $WorkDir\restores" }
$entry = Get-Content -LiteralPath $entryFile -Raw | ConvertFrom-Json
if (-not $InPlace -and (Get-VM -Name $Name -ErrorAction SilentlyContinue)) { throw "VmExists: a VM named '$Name' exists on $env:COMPUTERNAME" }
$path = $entry.Path
$vhdDir = Join-Path $path 'Virtual Hard Disks'
New-Item -ItemType Directory -Force -Path $vhdDir | Out-Null
$switches = @(Get-VMSwitch | ForEach-Object { $_.Name })
function Get-Mapped([string]$Switch) {
    if ($NetworkMap -and $NetworkMap.psobject.Properties[$Switch]) { return [string]$NetworkMap.$Switch }
    return $null
}
function Get-Place($Drive) { '{0}{1}:{2}' -f @{ 0 = 'ide'; 1 = 'scsi' }[[int]$Drive.ControllerType], $Drive.ControllerNumber, $Drive.ControllerLocation }
$staged = @{}
function Get-Target($d) { if ($d.Place) { [string]$d.Place } else { [string]$d.Name } }
foreach ($d in $Disks) { $staged[(Get-Target $d)] = [string]$d.Path }
$incompatibilities = @()
$replaced = @()
$report = $null
if ($InPlace) {
    $method = 'in-place'
    $vm = Get-VM -Name $Name
    if ($vm.State -ne 'Off') { throw "VmNotOff: VM '$Name' is not off ($($vm.State)); an in-place restore needs it off" }
    foreach ($drive in @(Get-VMHardDiskDrive -VM $vm)) {
        $place = Get-Place $drive
        if (-not $staged.ContainsKey($place)) { continue }
        $target = Join-Path $vhdDir (Split-Path -Path $staged[$place] -Leaf)
        Move-Item -LiteralPath $staged[$place] -Destination $target
        $replaced += [pscustomobject]@{ Name = $place; Old = $drive.Path; Path = $target }
        Set-VMHardDiskDrive -VMHardDiskDrive $drive -Path $target
    }
} elseif ($ConfigFile) {
    try {
        $report = Compare-VM -Path $ConfigFile -Copy -GenerateNewId -VirtualMachinePath $path -SnapshotFilePath $path `
            -SmartPagingFilePath $path -VhdDestinationPath $vhdDir
    } catch { $report = $null }
}
if ($InPlace) {
    # done above: nothing to import
} elseif ($report) {
    $method = 'import'
    $vm = $report.VM
    Rename-VM -VM $vm -NewName $Name
    foreach ($i in $report.Incompatibilities) {
        if ($i.MessageId -eq 33012) {
            $adapter = $i.Source
            $from = [string]$adapter.SwitchName
            $to = Get-Mapped $from
            if ($to -and $switches -contains $to) {
                Connect-VMNetworkAdapter -VMNetworkAdapter $adapter -SwitchName $to
                $resolution = "connected to $to (network map)"
            } else {
                Disconnect-VMNetworkAdapter -VMNetworkAdapter $adapter
                $resolution = 'disconnected'
            }
            $incompatibilities += [pscustomobject]@{ MessageId = $i.MessageId; Message = $i.Message; Switch = $from; Resolution = $resolution }
        }
    }
    foreach ($a in Get-VMNetworkAdapter -VM $vm) {
        $to = Get-Mapped ([string]$a.SwitchName)
        if ($to -and $switches -contains $to) { Connect-VMNetworkAdapter -VMNetworkAdapter $a -SwitchName $to }
    }
    foreach ($drive in @(Get-VMHardDiskDrive -VM $vm)) {
        $place = Get-Place $drive
        if ($staged.ContainsKey($place)) { Set-VMHardDiskDrive -VMHardDiskDrive $drive -Path $staged[$place] }
        else { Remove-VMHardDiskDrive -VMHardDiskDrive $drive }
    }
    $vm = Import-VM -CompatibilityReport $report
} else {
    $method = 'rebuild'
    $vm = New-VM -Name $Name -Path (Split-Path -Path $path -Parent) -Generation ([int]$Description.Generation) `
        -MemoryStartupBytes ([int64]$Description.MemoryStartupBytes) -NoVHD
    Set-VMProcessor -VM $vm -Count ([int]$Description.ProcessorCount)
    Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter
    foreach ($n in @($Description.NetworkAdapters)) {
        if (-not $n) { continue }
        $from = [string]$n.SwitchName
        $to = Get-Mapped $from
        if (-not $to) { $to = $from }
        $mac = if ($n.MacAddress) { [string]$n.MacAddress } else { $null }
        if ($to -and $switches -contains $to) {
            if ($mac) { Add-VMNetworkAdapter -VM $vm -SwitchName $to -StaticMacAddress $mac } else { Add-VMNetworkAdapter -VM $vm -SwitchName $to }
        } else {
            if ($mac) { Add-VMNetworkAdapter -VM $vm -StaticMacAddress $mac } else { Add-VMNetworkAdapter -VM $vm }
            $incompatibilities += [pscustomobject]@{ MessageId = 33012; Message = "Could not find Ethernet switch '$from'."; Switch = $from; Resolution = 'disconnected' }
        }
    }
    foreach ($d in $Disks) {
        $target = Join-Path $vhdDir (Split-Path -Path ([string]$d.Path) -Leaf)
        Copy-Item -LiteralPath ([string]$d.Path) -Destination $target
        $m = [regex]::Match((Get-Target $d), '^([a-z]+)(\d+):(\d+)$')
        $type = if ($m.Groups[1].Value -eq 'ide' -and [int]$Description.Generation -eq 1) { 'IDE' } else { 'SCSI' }
        $number = [int]$m.Groups[2].Value; $location = [int]$m.Groups[3].Value
        if ($type -eq 'SCSI') {
            # New-VM makes no SCSI controller in generation 1 and one in generation 2
            while (@(Get-VMScsiController -VM $vm).Count -le $number) { Add-VMScsiController -VM $vm }
        } else {
            # generation 1's DVD drive (IDE 1:0) gives its place to a disk the point has there
            Get-VMDvdDrive -VM $vm | Where-Object { $_.ControllerNumber -eq $number -and $_.ControllerLocation -eq $location } | Remove-VMDvdDrive
        }
        Add-VMHardDiskDrive -VM $vm -ControllerType $type -ControllerNumber $number -ControllerLocation $location -Path $target
    }
}
if ($PowerOn) { Start-VM -VM $vm }
$vm = Get-VM -Id $vm.Id
[pscustomobject]@{
    Name              = $vm.Name
    VmId              = [string]$vm.Id
    Method            = $method
    Generation        = [int]$vm.Generation
    Incompatibilities = @($incompatibilities)
    Replaced          = @($replaced)
    Disks             = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object { [pscustomobject]@{ Name = (Get-Place $_); Path = $_.Path } })
    State             = [int]$vm.State
}
