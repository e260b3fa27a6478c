"""The jail around the VMM process: what a guest that took over kvmpy could still reach.

kvmpy cannot be copied into an empty chroot as Firecracker's static binary is, so it
jails itself: it opens and imports what it needs, then enters the cell (namespaces,
``pivot_root``, cgroups, resource limits, unprivileged ids, ``no_new_privs``,
Landlock) and every thread installs the seccomp filter of its role.
docs/security.md has the threat model and what each layer stops.
"""
