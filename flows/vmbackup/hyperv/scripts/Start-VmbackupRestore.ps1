<#
.SYNOPSIS
    Start a restored (or rolled back) VM once its restore is complete: the
    restore procedure powers a VM on after a drill has compared its disks,
    so that nothing the guest writes while it boots is compared.
.DESCRIPTION
    -VMId names the VM (Import-VmbackupRestore.ps1 answered it); -Name is
    checked against it. A VM already running is left as it is.
    Run by hand:  .\Start-VmbackupRestore.ps1 -VMId 5f6b... -Name web01-restored
#>
param(
    [Parameter(Mandatory = $true)][string]$VMId,
    [Parameter(Mandatory = $true)][string]$Name
)
$ErrorActionPreference = 'Stop'

$vm = Get-VM -Id $VMId -ErrorAction SilentlyContinue
if (-not $vm) { throw "VmNotFound: no VM with Id '$VMId' on $env:COMPUTERNAME" }
if ($vm.Name -ne $Name) { throw "VmNotFound: VM '$VMId' is named '$($vm.Name)', not '$Name'" }
if ($vm.State -ne 'Running') { Start-VM -VM $vm }
$vm = Get-VM -Id $VMId
[pscustomobject]@{ Name = $vm.Name; VmId = [string]$vm.Id; State = [int]$vm.State }
