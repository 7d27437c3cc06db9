"""The kernel side's contract, shared by the agent (which loads and fills the maps) and the
node proxy (which reads the original-destination map): ``structs`` mirrors ``bpf/lib/shoal.h``,
``bpfsys`` is the bpf(2) syscall, ``origdst`` the proxy's lookup."""
