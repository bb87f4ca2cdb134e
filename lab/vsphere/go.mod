module github.com/vmbackup/vmbackup/lab/vsphere

go 1.19

require github.com/vmware/govmomi v0.24.2
