"""Reading source disks (raw, VMDK, qcow2, VHD/VHDX via dissect.hypervisor) and writing restore points."""
