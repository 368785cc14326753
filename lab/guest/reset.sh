#!/bin/bash
# Run in a lab VM by 'scripts/lab reset': back to empty data disks and no rcopy state, without a reboot.
# Order matters: stop users of the devices, unmount, tear down nbd/loop/dm from the top, then wipe.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
pkill -9 -f '/usr/local/bin/rcopy|python3 -m rcopy' 2>/dev/null
pkill -9 -x nbdkit 2>/dev/null; pkill -9 -x qemu-nbd 2>/dev/null; pkill -9 -x nbd-server 2>/dev/null
pkill -9 -x nbdcopy 2>/dev/null
fuser -k -9 /dev/vdb* /dev/vdc* /dev/dm-* /dev/nbd* /dev/loop* >/dev/null 2>&1
awk '$1 ~ "^/dev/(mapper/|dm-|nbd|loop|vd[bc])" {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
for pidfile in /sys/block/nbd*/pid; do
  [ -e "$pidfile" ] && nbd-client -d "/dev/$(basename "$(dirname "$pidfile")")" >/dev/null 2>&1
done
pkill -9 -x nbd-client 2>/dev/null
for try in 1 2 3; do
  dmsetup remove_all --force >/dev/null 2>&1
  [ -z "$(dmsetup ls 2>/dev/null | grep -v '^No devices found')" ] && break
  sleep 1
done
losetup -D
wipefs -a -q /dev/vdb /dev/vdc
blkdiscard -f /dev/vdb && blkdiscard -f /dev/vdc   # qemu punches holes: the disks read back zeros
rm -rf /var/lib/rcopy /etc/rcopy /run/rcopy /etc/lvm/backup/* /etc/lvm/archive/* /tmp/*
udevadm settle --timeout=30
left=$(dmsetup ls 2>/dev/null | grep -v '^No devices found')
if [ -n "$left" ]; then
  echo "reset: device-mapper devices left: $left" >&2
  exit 1
fi
