<#
.SYNOPSIS
    The VMs of this Hyper-V host: name, id and state, for vmbackup's selection.
.DESCRIPTION
    Read-only. vmbackup matches the plan's selection (names with wildcards,
    host names, exclusions) against this list, then asks Get-VmbackupVm.ps1
    about each selected VM. The list is inside an object so that a host with
    one VM still answers a JSON array.
    Run by hand:  .\Get-VmbackupVmList.ps1
#>
param()
$ErrorActionPreference = 'Stop'

[pscustomobject]@{
    ComputerName = $env:COMPUTERNAME
    VMs          = @(Get-VM | Sort-Object -Property Name | ForEach-Object {
            [pscustomobject]@{ Name = $_.Name; Id = [string]$_.Id; State = [int]$_.State } })
}
