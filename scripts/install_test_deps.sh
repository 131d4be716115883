#!/usr/bin/env bash
# System packages the test suite needs on a fresh Debian machine (CI runs this before the tests).
# Idempotent: installs only what is missing, so a second run does nothing and needs no network.
#   * openssh-server: the ssh driver is tested against a real sshd on loopback (tests/sshd.py).
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_test_deps: ${missing[*]} missing and not root; the tests that need them will be skipped" >&2
  exit 0
fi
echo "install_test_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
