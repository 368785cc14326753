#!/bin/bash
# Provisioning of a Vagrant lab VM (see Vagrantfile), run as root inside the VM:
#   provision.sh system NAME HOST1 ADDR1 HOST2 ADDR2   packages, names on the link, root ssh, modules, disks
#   provision.sh rcopy                                 install rcopy from the synced tree (/rcopy)
# The package list is the qemu lab's (scripts/rcopylab/recipe/packages) minus its kernel: the box's
# Debian kernel has the same dm-snapshot, dm-thin-pool, nbd and loop modules.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
recipe=/rcopy/scripts/rcopylab/recipe

system() {
  local name=$1; shift
  mapfile -t pkgs < <(sed 's/#.*//; s/[[:space:]]//g' "$recipe/packages" | grep -v -E '^$|^linux-image|^initramfs-tools')
  mapfile -t missing < <(missing "${pkgs[@]}")
  if ((${#missing[@]})); then   # a stock box; the lab's own box (scripts/vagrant-lab) has them all
    echo "provision: installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  sed 's/#.*//' "$recipe/wheels" | while read -r wheel; do
    [ -z "$wheel" ] || python3 -m pip show -q "${wheel%%==*}" >/dev/null 2>&1 ||
      python3 -m pip install -q --break-system-packages --no-deps "$wheel"
  done

  while (($#)); do          # the peers' names resolve to their private-network (link) addresses
    sed -i "/[[:space:]]$1\$/d" /etc/hosts
    echo "$2 $1" >>/etc/hosts
    shift 2
  done

  install -d -m 700 /root/.ssh
  install -m 600 /tmp/id_lab /root/.ssh/id_ed25519
  install -m 644 /tmp/id_lab.pub /root/.ssh/id_ed25519.pub
  grep -qxF "$(cat /tmp/id_lab.pub)" /root/.ssh/authorized_keys 2>/dev/null || cat /tmp/id_lab.pub >>/root/.ssh/authorized_keys
  install -m 600 "$recipe/ssh_config" /root/.ssh/config
  rm -f /tmp/id_lab /tmp/id_lab.pub

  mkdir -p /etc/modules-load.d
  printf '%s\n' dm_snapshot dm_thin_pool nbd loop >/etc/modules-load.d/rcopy-lab.conf
  modprobe -a dm_snapshot dm_thin_pool nbd loop

  # VirtualBox attaches the data disks as sdb/sdc: give them the lab's names too.
  if [ ! -e /dev/vdb ] && [ -e /dev/sdb ]; then
    printf '%s\n' 'KERNEL=="sdb", SYMLINK+="vdb"' 'KERNEL=="sdc", SYMLINK+="vdc"' >/etc/udev/rules.d/60-rcopy-lab.rules
    udevadm control --reload
    udevadm trigger --action=add --subsystem-match=block
    udevadm settle
  fi
  echo "provision: $name ready"
}

# The Debian packages of "$@" that are not installed, one a line.
missing() {
  local p
  for p; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || echo "$p"
  done
}

# A wheel built on the host (scripts/vagrant-lab puts it in vagrant/.wheel) installs in a second, as in
# scripts/lab; without one, pip builds rcopy's C module in the VM.
rcopy() {
  local wheel
  wheel=$(ls /rcopy/vagrant/.wheel/rcopy-*.whl 2>/dev/null | tail -n 1)
  if [ -n "$wheel" ]; then
    python3 /rcopy/scripts/rcopylab/guest/install_wheel.py "$wheel"
  else
    mapfile -t missing < <(missing gcc python3-dev libblkid-dev pkg-config)
    if ((${#missing[@]})); then
      apt-get update -q
      apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    python3 -m pip install -q --break-system-packages --no-deps --force-reinstall /rcopy
  fi
  echo "provision: /usr/local/bin/rcopy: $(/usr/local/bin/rcopy --version)"
}

case ${1:-} in
  system) shift; system "$@" ;;
  rcopy) rcopy ;;
  *) echo "usage: provision.sh system NAME HOST ADDR HOST ADDR | provision.sh rcopy" >&2; exit 2 ;;
esac
