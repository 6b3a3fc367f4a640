"""An emulated Raspberry Pi 4 (aarch64, Cortex-A72) on this machine, through QEMU user mode.

``python -m edgeqat.harness.qemu setup`` assembles an aarch64 userland into a cache
directory (``$EDGEQAT_SYSROOT``, else ``~/.cache/edgeqat/rpi4-sysroot``):

* Debian bookworm arm64 packages (Python 3.11 and the libraries it links), fetched with
  ``apt-get download`` against a *private* apt state directory with
  ``APT::Architecture=arm64``, so the host's dpkg architectures and apt lists are never
  touched, and unpacked with ``dpkg -x``;
* aarch64 wheels (``ai-edge-litert``, ``numpy``) from PyPI via ``pip download
  --platform manylinux_2_27_aarch64``, unzipped into ``/usr/local/lib/python3.11/
  dist-packages``;
* a Cortex-A72 ``/proc/cpuinfo`` inside the sysroot (LiteRT reads it; the host's x86 one
  makes it crash under emulation);
* with ``--runtime tflite_runtime``: tflite-runtime 2.14 and numpy 1.26 (it fails under
  numpy 2) in their own directory beside the sysroot, ``<sysroot>.tflite_runtime``, put
  on PYTHONPATH for device profiles with ``runtime = "tflite_runtime"``.

The sysroot is built in a sibling temp directory and renamed into place, so an interrupted
setup never leaves a half-built cache; a stamp file records the recipe, and a second setup
with the same recipe returns at once. The runner then runs as
``QEMU_CPU=cortex-a72 qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 runner.py``.
QEMU's default CPU (``max``) takes SME kernel paths whose int8 outputs differ; always name
the CPU. Emulated timings say nothing about a real Pi.

Needs on the host: ``qemu-user-static``, ``apt-get`` and ``dpkg`` (Debian/Ubuntu), network
access to the Debian mirror and PyPI on the first setup only.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from edgeqat.errors import UserError

QEMU = "qemu-aarch64-static"
PYTHON = "usr/bin/python3.11"
SITE = "usr/local/lib/python3.11/dist-packages"
STAMP = ".edgeqat-sysroot.json"
INSTALL_HINT = "apt-get install -y qemu-user-static"

# Debian bookworm arm64: Python 3.11 and the shared libraries its stdlib modules link.
DEB_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
    "libstdc++6", "libgcc-s1", "gcc-12-base", "libssl3", "libffi8", "zlib1g", "libexpat1",
    "libsqlite3-0", "liblzma5", "libbz2-1.0", "libncursesw6", "libtinfo6", "libreadline8",
    "libuuid1", "libcrypt1", "libdb5.3", "libnsl2", "libtirpc3", "libgssapi-krb5-2",
    "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1",
)
# aarch64 wheels for the device side. numpy 2 works with ai-edge-litert (not tflite_runtime).
WHEELS = ("ai-edge-litert==2.3.0", "numpy==2.2.6")
WHEEL_PLATFORMS = ("manylinux_2_27_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")
# Device runtimes whose wheels cannot share the sysroot's site directory: tflite-runtime
# 2.14 (the last one built for Python 3.11 on aarch64) fails under numpy 2. Each gets its
# own directory beside the sysroot, first on PYTHONPATH when a profile selects it, so the
# sysroot (and its recipe, shared with every branch using the cache) stays as it is.
RUNTIME_WHEELS = {"tflite_runtime": ("tflite-runtime==2.14.0", "numpy==1.26.4")}
RUNTIME_SMOKE = {"tflite_runtime": "from tflite_runtime import interpreter"}
# tflite-runtime 2.14's aarch64 wheel is tagged manylinux_2_34 (bookworm has glibc 2.36).
RUNTIME_PLATFORMS = ("manylinux_2_34_aarch64", *WHEEL_PLATFORMS)
# Files the runner never needs: dropped to keep the cache (and CI) lean.
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
         "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
         "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip",
         "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data")

CPUINFO_A72 = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
    "CPU part\t: 0xd08\nCPU revision\t: 3\n\n" for i in range(4)
) + "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"


class QemuError(UserError):
    """The emulated device cannot be set up or started; the message says what to install."""


def default_sysroot() -> Path:
    """``$EDGEQAT_SYSROOT``, else ``~/.cache/edgeqat/rpi4-sysroot``."""
    env = os.environ.get("EDGEQAT_SYSROOT")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgeqat" / "rpi4-sysroot"


def recipe() -> dict:
    """What the sysroot is made of; a change here rebuilds the cache."""
    return {"debian": "bookworm", "packages": list(DEB_PACKAGES), "wheels": list(WHEELS),
            "prune": list(PRUNE), "cpuinfo": hashlib.sha256(CPUINFO_A72.encode()).hexdigest()}


def is_ready(sysroot: Path | None = None) -> bool:
    """The sysroot exists and was built from the current recipe."""
    sysroot = Path(sysroot or default_sysroot())
    try:
        stamp = json.loads((sysroot / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == recipe() and (sysroot / PYTHON).exists()


def qemu_binary() -> str:
    """Path of ``qemu-aarch64-static``.

    Raises:
      QemuError: it is not installed.
    """
    found = shutil.which(QEMU)
    if not found:
        raise QemuError(f"{QEMU} not found on PATH; install it with: {INSTALL_HINT}")
    return found


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise QemuError(f"sysroot setup: {what} failed (exit {p.returncode}): "
                        + " | ".join(tail))


def _download_debs(dest: Path, work: Path) -> list[Path]:
    """arm64 .debs via a private apt state: the host's dpkg/apt configuration is untouched."""
    for tool in ("apt-get", "dpkg"):
        if not shutil.which(tool):
            raise QemuError(f"sysroot setup needs {tool} (a Debian or Ubuntu host)")
    lists, cache = work / "apt-lists", work / "apt-cache"
    for d in (lists / "partial", cache / "archives" / "partial", dest):
        d.mkdir(parents=True, exist_ok=True)
    opts = ["-q", "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures=arm64", "-o", "Debug::NoDropPrivs=1"]
    _run(["apt-get", *opts, "update"], "apt-get update (arm64 lists, private state)")
    _run(["apt-get", *opts, "download", *DEB_PACKAGES], "apt-get download (arm64)", cwd=dest)
    return sorted(dest.glob("*.deb"))


def _download_wheels(dest: Path, wheels: tuple[str, ...] = WHEELS,
                     platforms: tuple[str, ...] = WHEEL_PLATFORMS) -> list[Path]:
    platforms = [a for p in platforms for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          *platforms, "--python-version", "3.11", "--implementation", "cp",
          "-d", str(dest), *wheels], "pip download (aarch64 wheels)")
    return sorted(dest.glob("*.whl"))


def runtime_site(sysroot: Path, runtime: str) -> Path | None:
    """The extra site directory a device runtime needs (None: the sysroot's own)."""
    if runtime not in RUNTIME_WHEELS:
        return None
    return Path(sysroot).parent / f"{Path(sysroot).name}.{runtime}"


def _runtime_recipe(runtime: str) -> dict:
    return {"runtime": runtime, "wheels": list(RUNTIME_WHEELS[runtime]),
            "platforms": list(RUNTIME_PLATFORMS)}


def is_runtime_ready(sysroot: Path, runtime: str) -> bool:
    """The runtime needs no extra directory, or it exists from the current recipe."""
    site = runtime_site(sysroot, runtime)
    if site is None:
        return True
    try:
        stamp = json.loads((site / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == _runtime_recipe(runtime)


def setup_runtime(sysroot: Path | None, runtime: str, *, force: bool = False,
                  log=print) -> Path | None:
    """Builds the sysroot if needed, then ``runtime``'s own site directory; returns it.

    Raises:
      QemuError: as ``setup``, or the emulated Python cannot import the runtime.
    """
    sysroot = setup(sysroot, log=log)
    site = runtime_site(sysroot, runtime)
    if site is None or (not force and is_runtime_ready(sysroot, runtime)):
        return site
    with open(site.parent / f".{site.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_runtime_ready(sysroot, runtime):
            return site
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{runtime}-build-", dir=site.parent))
        try:
            root = work / "site"
            root.mkdir()
            for whl in _download_wheels(work / "wheels", RUNTIME_WHEELS[runtime],
                                        RUNTIME_PLATFORMS):
                with zipfile.ZipFile(whl) as z:
                    z.extractall(root)
            p = subprocess.run(
                command(sysroot, ["-c", f"import numpy; {RUNTIME_SMOKE[runtime]}; "
                                        "print(numpy.__version__)"]),
                capture_output=True, text=True, env=environment(pythonpath=root),
                timeout=300)
            if p.returncode != 0:
                raise QemuError(f"{runtime} site setup: the emulated python cannot import "
                                f"it: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            (root / STAMP).write_text(json.dumps(
                {"recipe": _runtime_recipe(runtime), "numpy": p.stdout.strip(),
                 "built_s": round(time.monotonic() - t0, 1), "bytes": _size(root)}, indent=1))
            if site.exists():
                site.rename(work / "old")
            root.rename(site)
            log(f"{runtime} site {site} built in {time.monotonic() - t0:.1f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return site


def setup(sysroot: Path | None = None, *, force: bool = False, log=print) -> Path:
    """Builds the aarch64 sysroot unless a current one is cached; returns its path.

    Raises:
      QemuError: qemu, apt-get, dpkg or the network is missing, or a download failed.
    """
    sysroot = Path(sysroot or default_sysroot())
    if not force and is_ready(sysroot):
        log(f"sysroot {sysroot} is ready (cached)")
        return sysroot
    sysroot.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers, two pipelines): the others wait, then
    # find the sysroot ready instead of swapping it out from under a running emulation.
    with open(sysroot.parent / f".{sysroot.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_ready(sysroot):
            log(f"sysroot {sysroot} is ready (built by another process)")
            return sysroot
        return _build(sysroot, log)


def _build(sysroot: Path, log) -> Path:
    qemu_binary()
    t0 = time.monotonic()
    sysroot.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".sysroot-build-", dir=sysroot.parent))
    try:
        root = work / "root"
        root.mkdir()
        debs = _download_debs(work / "debs", work)
        log(f"downloaded {len(debs)} arm64 packages ({time.monotonic() - t0:.1f} s)")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
        wheels = _download_wheels(work / "wheels")
        log(f"downloaded {len(wheels)} aarch64 wheels ({time.monotonic() - t0:.1f} s)")
        site = root / SITE
        site.mkdir(parents=True, exist_ok=True)
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
        for rel in PRUNE:
            shutil.rmtree(root / rel, ignore_errors=True)
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc" / "cpuinfo").write_text(CPUINFO_A72)
        _smoke_test(root)
        stamp = {"recipe": recipe(), "built_s": round(time.monotonic() - t0, 1),
                 "bytes": _size(root)}
        (root / STAMP).write_text(json.dumps(stamp, indent=1))
        if sysroot.exists():
            old = work / "old"
            sysroot.rename(old)
        root.rename(sysroot)
        log(f"sysroot {sysroot} built in {stamp['built_s']} s, "
            f"{stamp['bytes'] / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sysroot


def _size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and
               not p.is_symlink())


def command(sysroot: Path, argv: list[str]) -> list[str]:
    """The host command line that runs ``python3.11 argv...`` inside the emulated Pi."""
    return [qemu_binary(), "-L", str(sysroot), str(sysroot / PYTHON), *argv]


def environment(cpu: str = "cortex-a72", pythonpath: Path | None = None) -> dict:
    """The environment for ``command``: the emulated CPU, and no host Python leaking in;
    ``pythonpath`` (a runtime's own site directory) goes before the sysroot's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(QEMU_CPU=cpu, PYTHONNOUSERSITE="1", LC_ALL="C")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _smoke_test(root: Path) -> None:
    p = subprocess.run(
        command(root, ["-c", "import numpy, platform; from ai_edge_litert import interpreter;"
                             "print(platform.machine(), numpy.__version__)"]),
        capture_output=True, text=True, env=environment(), timeout=300)
    if p.returncode != 0 or "aarch64" not in p.stdout:
        raise QemuError("sysroot setup: the emulated python cannot import ai_edge_litert: "
                        + (p.stderr.strip().splitlines() or ["no output"])[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeqat.harness.qemu",
                                 description="Emulated Raspberry Pi 4 sysroot.")
    ap.add_argument("action", choices=("setup", "check", "path"))
    ap.add_argument("--sysroot", type=Path, default=None,
                    help="default: $EDGEQAT_SYSROOT or ~/.cache/edgeqat/rpi4-sysroot")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--runtime", default="ai_edge_litert",
                    choices=("ai_edge_litert", *RUNTIME_WHEELS),
                    help="also build this device runtime's own site directory")
    args = ap.parse_args(argv)
    sysroot = args.sysroot or default_sysroot()
    try:
        if args.action == "path":
            print(sysroot)
        elif args.action == "check":
            ready = is_ready(sysroot) and is_runtime_ready(sysroot, args.runtime)
            print(f"{sysroot}: {'ready' if ready else 'missing or stale'}")
            return 0 if ready else 1
        else:
            setup(sysroot, force=args.force)
            setup_runtime(sysroot, args.runtime, force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
