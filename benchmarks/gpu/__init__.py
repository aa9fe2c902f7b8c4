"""Every GPU figure in one prepared command (`suite`), its checks (`checks/`) and the scripts for the device."""
