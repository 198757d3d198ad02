#!/usr/bin/env bash
# Installs what the training tool needs from Debian's packages (run as root, or with sudo).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# python3-torch is fast here only with the pthread OpenBLAS (about 190 GFLOP/s against about 6 without it).
$SUDO apt-get install -y -qq python3-torch libopenblas0-pthread python3-numpy python3-matplotlib python3-regex \
  bible-kjv bible-kjv-text wordnet-base python3.11-doc
