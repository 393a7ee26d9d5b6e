"""The qemu guest runner behind :func:`control.guest.run_in_guest`.

Theory of operation::

    ensure_kernel()   apt-cache depends linux-image-amd64 -> linux-image-X
                      apt-get download + dpkg-deb -x into the cache (once)
                      vmlinuz's xz payload -> ELF vmlinux (PVH boot, once)
    run_in_guest()    module closure from .modinfo "depends=" -> initramfs
                      (newc cpio written here: busybox, /init, modules)
                      qemu: 9p "hostroot" (/, read-only), 9p "guestout" (tmp dir)
    /init (guest)     insmod modules, overlay(tmpfs over 9p root) -> /newroot,
                      chroot: cmd.sh > stdout 2> stderr; echo $? > rc; poweroff

The guest never writes to the host except through the scratch ``guestout``
directory, which is removed after the run.  Nothing here asks for the network
except ``apt-get`` talking to the configured Debian archive.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("espgate.guest")

CACHE_DIR = Path(os.environ.get("ESPGATE_GUEST_CACHE", "/var/cache/espgate-guest"))
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
META_PACKAGE = "linux-image-amd64"

# loaded in this order after their dependencies; missing or built-in ones skipped.
# The guest has no modprobe, so nothing is loaded on demand: seqiv and echainiv
# need the default RNG (drbg, seeded through hmac(sha512) and the jitter RNG)
# or every ESP SA fails to initialise its AEAD.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "overlay",
    "xfrm_algo",
    "xfrm_user",
    "esp4",
    "esp6",
    "sha512_generic",
    "sha512_ssse3",
    "sha3_generic",
    "jitterentropy_rng",
    "drbg",
    "authenc",
    "gcm",
    "seqiv",
    "echainiv",
    "ctr",
    "ghash_generic",
    "ghash_clmulni_intel",
    "aesni_intel",
    "xfrm_interface",
    "tun",
    "veth",
    # a NAT in front of the client (selftest kernel-nat-rebind); libcrc32c needs
    # a crc32c hash loaded before it (a soft dependency modinfo doesn't list)
    "crc32c_generic",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
)


class GuestError(RuntimeError):
    """The guest could not be built, booted or did not report back."""


class GuestUnavailable(GuestError):
    """qemu, busybox or the kernel package cannot be had on this host."""


@dataclass(frozen=True)
class KernelTree:
    """An unpacked Debian kernel package in the cache."""

    root: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise GuestUnavailable(f"{argv[0]} failed ({proc.returncode}): {tail[0]}")
    return proc.stdout


def _find_tree(cache: Path) -> KernelTree | None:
    for root in sorted(cache.glob("linux-image-*-amd64"), reverse=True):
        boot = sorted((root / "boot").glob("vmlinuz-*"))
        if root.is_dir() and boot:
            version = boot[-1].name.removeprefix("vmlinuz-")
            if (root / "lib" / "modules" / version).is_dir():
                return KernelTree(root, version)
    return None


def ensure_kernel(cache: Path = CACHE_DIR, fetch: bool = True) -> KernelTree:
    """Return the cached kernel tree, fetching and unpacking it if needed."""
    tree = _find_tree(cache)
    if tree is not None or not fetch:
        if tree is None:
            raise GuestUnavailable(f"no unpacked kernel in {cache}")
        return tree
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found, cannot fetch a kernel")

    # the meta package names the current image package
    depends = _run(["apt-cache", "depends", META_PACKAGE])
    names = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names:
        raise GuestUnavailable(f"{META_PACKAGE} names no kernel image package")
    name = names[0]

    # download and unpack, never install
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", name, cache)
    _run(["apt-get", "download", name], cwd=cache)
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        raise GuestUnavailable(f"apt-get download left no {name} package")
    staging = cache / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)])
    staging.rename(cache / name)
    debs[-1].unlink()
    tree = _find_tree(cache)
    if tree is None:
        raise GuestUnavailable(f"{name} has no vmlinuz or modules")
    return tree


def _vmlinux(tree: KernelTree) -> Path:
    """Return an uncompressed ELF kernel (PVH boot, ~5 s faster), else vmlinuz."""
    out = tree.root / "boot" / f"vmlinux-{tree.version}"
    if out.exists():
        return out
    data = tree.vmlinuz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return tree.vmlinuz
    try:
        elf = lzma.LZMADecompressor().decompress(data[at:])
    except lzma.LZMAError:
        return tree.vmlinuz
    if not elf.startswith(b"\x7fELF"):
        return tree.vmlinuz
    tmp = out.with_suffix(".partial")
    tmp.write_bytes(elf)
    tmp.rename(out)
    return out


def _modinfo_depends(path: Path) -> list[str]:
    data = path.read_bytes()
    at = data.find(b"\x00depends=")
    if at < 0:
        return []
    end = data.index(b"\x00", at + 1)
    value = data[at + 9 : end].decode()
    return [d for d in value.split(",") if d]


def module_closure(moddir: Path, names: tuple[str, ...]) -> list[Path]:
    """Return the module files for names and their dependencies, deps first."""
    index = {p.stem.replace("-", "_"): p for p in moddir.rglob("*.ko")}
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key not in index:
            return  # built in, or already placed
        seen.add(key)
        for dep in _modinfo_depends(index[key]):
            visit(dep)
        ordered.append(index[key])

    for name in names:
        visit(name)
    return ordered


class _Cpio:
    """A minimal newc cpio writer, enough for an initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\x00"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf.write(header + encoded)
        self.buf.write(b"\x00" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()


_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod /modules/$m 2>>/modules.log; done
mkdir -p /host /out /upper /newroot
o=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o $o,cache=loose,ro hostroot /host || echo "guest: no host root"
mount -t 9p -o $o guestout /out || echo "guest: no output share"
cp /modules.log /out/modules.log
mount -t tmpfs -o size=75% upper /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w \
    /newroot || echo "guest: overlay failed"
r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sys $r/sys
mount -t devtmpfs dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts
mount -t tmpfs shm $r/dev/shm
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs run $r/run
mkdir -p $r/run/espgate-guest
mount --bind /out $r/run/espgate-guest
hostname egt-guest
ip link set lo up
chroot $r /bin/sh /run/espgate-guest/cmd.sh
sync
poweroff -f
"""


def _cmd_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd {shlex.quote(cwd)} || exit 127")
    out = "/run/espgate-guest"
    lines.append(f"{shlex.join(argv)} </dev/null >{out}/stdout 2>{out}/stderr")
    lines.append(f"echo $? >{out}/rc.tmp && mv {out}/rc.tmp {out}/rc")
    return "\n".join(lines) + "\n"


def accelerator() -> str:
    """Use KVM only where the CPU shows real VMX/SVM; otherwise TCG."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if ("vmx" in flags or "svm" in flags) and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg,thread=multi"


_BASE_CMDLINE = (
    "console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests=1 rdinit=/init"
)


def _cmdline() -> str:
    extra = os.environ.get("ESPGATE_GUEST_APPEND", "")
    base = os.environ.get("ESPGATE_GUEST_BASE", _BASE_CMDLINE)
    return f"{base} {extra}".strip()


def _venv_bin() -> str:
    # the venv running us, else the repository's own .venv
    if sys.prefix != sys.base_prefix:
        return str(Path(sys.prefix) / "bin")
    return str(Path(__file__).resolve().parents[2] / ".venv" / "bin")


def guest_available(fetch: bool = False) -> tuple[bool, str]:
    """Say whether a guest can be booted here, and if not, why."""
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not installed (Debian package qemu-system-x86)"
    if not os.access(BUSYBOX, os.X_OK):
        return False, f"{BUSYBOX} missing (Debian package busybox-static)"
    try:
        ensure_kernel(fetch=fetch)
    except GuestUnavailable as exc:
        return False, str(exc)
    return True, "ok"


def run_in_guest(
    argv: list[str],
    timeout: float = 300.0,
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    memory_mb: int = 2048,
    cpus: int = 2,
) -> tuple[int, str, str]:
    """Boot the guest, run argv in it and return (rc, stdout, stderr)."""
    assert argv, "argv must not be empty"
    ok, reason = guest_available(fetch=True)
    if not ok:
        raise GuestUnavailable(reason)
    tree = ensure_kernel()
    kernel = _vmlinux(tree)
    modules = module_closure(tree.modules, GUEST_MODULES)
    guest_env = {
        "PATH": f"{_venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
        ":/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "ESPGATE_IN_GUEST": "1",
    }
    guest_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="egt-guest-") as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        (out / "cmd.sh").write_text(_cmd_script(argv, cwd or os.getcwd(), guest_env))

        # initramfs: busybox, /init, the module closure
        cpio = _Cpio()
        for d in ("bin", "dev", "proc", "sys", "modules"):
            cpio.dir(d)
        cpio.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        cpio.file("init", _INIT.encode(), 0o755)
        cpio.file("modules.list", "\n".join(p.name for p in modules).encode())
        for p in modules:
            cpio.file(f"modules/{p.name}", p.read_bytes())
        initrd = work / "initramfs.cpio"
        initrd.write_bytes(cpio.finish())

        console = work / "console.log"
        cmd = [
            QEMU,
            "-accel", accelerator(),
            "-cpu", "max",
            "-smp", str(cpus),
            "-m", str(memory_mb),
            "-M", "q35",
            "-nodefaults", "-display", "none", "-nic", "none", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", _cmdline(),
            "-device", "virtio-rng-pci",
            "-fsdev", "local,id=hostroot,path=/,readonly=on,"
            "security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=guestout,path={out},security_model=none",
            "-device", "virtio-9p-pci,fsdev=guestout,mount_tag=guestout",
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(
                f"guest still running after {timeout:.0f}s; console: " + _tail(console)
            ) from None
        except BaseException:
            # Ctrl-C or SIGTERM aimed at us alone: the guest goes with us
            proc.kill()
            proc.communicate()
            raise
        log.debug("guest ran %.1fs", time.monotonic() - started)

        # what the command left behind
        rc_file = out / "rc"
        if not rc_file.exists():
            raise GuestError(
                f"guest gave no exit code (qemu rc {proc.returncode}): "
                + _tail(console)
                + qemu_out.decode(errors="replace")[-500:]
            )
        rc = int(rc_file.read_text().strip() or "255")
        stdout = _read(out / "stdout")
        stderr = _read(out / "stderr")
        return rc, stdout, stderr


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, size: int = 1500) -> str:
    return _read(path)[-size:]
