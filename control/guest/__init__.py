"""Run a command inside a stock Debian kernel booted under qemu.

Theory of operation: this host's kernel lacks ESP and GCM, so the kernel XFRM path
is exercised in a guest.  :func:`run_in_guest` makes sure a Debian kernel package
is unpacked in a cache directory outside git (fetched with ``apt-get download``,
unpacked with ``dpkg-deb -x``, never installed), builds a small busybox initramfs
at run time holding the modules the guest needs, and boots it under qemu (KVM only
where the CPU has real VMX/SVM, TCG otherwise).  The host root is shared read-only
over 9p and mounted under a tmpfs overlay so the command can write anywhere; a
second, writable 9p share carries the command script in and stdout, stderr and
the exit code out.  See :mod:`control.guest.runner` for the details.
"""

from control.guest.runner import (
    GUEST_MODULES,
    GuestError,
    GuestUnavailable,
    accelerator,
    ensure_kernel,
    guest_available,
    run_in_guest,
)

__all__ = [
    "GUEST_MODULES",
    "GuestError",
    "GuestUnavailable",
    "accelerator",
    "ensure_kernel",
    "guest_available",
    "run_in_guest",
]
