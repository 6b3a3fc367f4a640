#!/bin/sh
# System packages and the cached emulated-Pi userland that the harness tests need.
# Idempotent: a second run installs nothing and reuses the sysroot cache
# ($EDGEQAT_SYSROOT, else ~/.cache/edgeqat/rpi4-sysroot; cache that directory in CI).
set -eu
need=""
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v ssh >/dev/null || need="$need openssh-client"
command -v qemu-aarch64-static >/dev/null || need="$need qemu-user-static"
if [ -n "$need" ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi
"${PYTHON:-python}" -m edgeqat.harness.qemu setup
