#!/bin/bash
# Run in a lab VM by 'scripts/lab reset': back to empty data disks and no rcopy state, without a reboot.
# Order matters: stop users of the devices, unmount, tear down nbd/loop/dm from the top, then wipe.
# Every exec costs ~0.5 s under TCG, so each step first checks with bash builtins whether it has work.
set -u
shopt -s nullglob extglob
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# LVM too: rcopy runs its LVM commands in a long-lived lvm shell, which outlives a killed rcopy and would
# go on creating or removing devices under the teardown below
pkill -9 -f '^(nbdkit|qemu-nbd|nbd-server|nbdcopy|nbd-client|nbdsh|lvm|lv[a-z]+|vg[a-z]+)( |$)|/usr/local/bin/rcopy|python3 -m rcopy'

# throttled replication links (Lab.throttle)
if [[ -e /run/lab-throttle ]]; then
  for l in /run/lab-link /run/lab-link2; do [[ -e $l ]] && tc qdisc del dev "$(<"$l")" root 2>/dev/null; done
  rm -f /run/lab-throttle
fi

# a device left suspended (a cut killed mid-way) blocks every opener, fuser and remove_all included
for f in /sys/block/dm-*/dm/suspended; do
  read -r v <"$f" && [[ $v == 1 ]] && { d=${f#/sys/block/}; dmsetup resume "/dev/${d%%/*}" 2>/dev/null; }
done
maps=(/dev/mapper/!(control)) loops=(/sys/block/loop*/loop/backing_file) nbds=(/sys/block/nbd*/pid)
if ((${#maps[@]} + ${#loops[@]} + ${#nbds[@]})); then
  fuser -s -k -9 /dev/vd[bc]* /dev/dm-* /dev/nbd* /dev/loop[0-9]*
fi
mounts=()
while read -r dev mnt _; do
  [[ $dev =~ ^/dev/(mapper/|dm-|nbd|loop|vd[bc]) ]] && mounts=("$mnt" "${mounts[@]}")
done </proc/mounts
((${#mounts[@]})) && umount -l "${mounts[@]}"
for pid in "${nbds[@]}"; do
  dev=${pid%/pid}
  nbd-client -d "/dev/${dev##*/}" >/dev/null 2>&1
done
if ((${#maps[@]})); then
  for try in 1 2 3; do
    dmsetup remove_all --force >/dev/null 2>&1
    left=(/dev/mapper/!(control))
    ((${#left[@]})) || break
    sleep 1
  done
fi
((${#loops[@]})) && losetup -D
# udev may still be working through events of devices the last test made (an LVM command killed above,
# an lvchange just before the end): such an event re-creates a /dev/VG link after the sweep below unless
# the queue is drained first (seen once: the next vgcreate failed, "/dev/rcopytest: already exists")
((${#maps[@]})) && udevadm settle --timeout=30
# /dev/VG folders outlive their dm devices (dmsetup removed them behind LVM's back), and a stale one
# makes the next vgcreate of that name fail: drop folders holding nothing but dangling links.
for dir in /dev/*/; do
  case $dir in /dev/@(block|char|disk|fd|mapper|pts|shm|net|bus|cpu|input|hugepages|mqueue)/) continue ;; esac
  stale=1
  for link in "$dir"*; do [[ -L $link && ! -e $link ]] || { stale=0; break; }; done
  ((stale)) && rm -rf "$dir"
done
# discard=unmap + detect-zeroes on the qemu side: the discard punches holes, the disks read back zeros
blkdiscard -f /dev/vdb 2>/dev/null
blkdiscard -f /dev/vdc 2>/dev/null
# an LVM configuration a test made its own (tests/lab/test_admin.py: a devices file, a filter)
[[ -e /etc/lvm/lvmlocal.conf.lab ]] && mv -f /etc/lvm/lvmlocal.conf.lab /etc/lvm/lvmlocal.conf
junk=(/etc/lvm/devices/system.devices /var/lib/rcopy /etc/rcopy /run/rcopy /etc/lvm/backup/* /etc/lvm/archive/* /tmp/* /tmp/.[!.]*)
((${#junk[@]})) && rm -rf "${junk[@]}"
udevadm settle --timeout=30   # closing the disks after the discard made udev re-probe them
# root's ssh between the VMs checks host keys as on a real installation (rcopy's agent command insists
# on it; the image's ssh config turned checking off): the peers' keys as they answer now. Also undoes
# what tests/lab/test_security.py changes: a wrong known host key, a restricted key for rcopy's agent.
# KexAlgorithms: why, in recipe/ssh_config.
printf 'Host primary backup primary-2 backup-2\n    User root\n    LogLevel ERROR\n    BatchMode yes\n    ConnectTimeout 10\n    KexAlgorithms curve25519-sha256\n' \
  >/root/.ssh/config
if grep -q '^restrict,' /root/.ssh/authorized_keys; then
  grep -v '^restrict,' /root/.ssh/authorized_keys >/root/.ssh/authorized_keys.new
  mv /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys
fi
rm -f /root/.ssh/id_ecdsa /root/.ssh/id_ecdsa.pub
# The scan (8 s of a 14 s reset under TCG) runs once per root disk: its result is kept beside
# known_hosts, which the reset then copies. Host keys live on the root disks, made with the image, so
# they change only with a new image, and that comes with new root disks (and no kept scan).
scan=/root/.ssh/known_hosts.lab
if [[ ! -s $scan ]]; then
  # right after both VMs booted, the peer's sshd can miss the first 10 s under a busy host: try again
  for try in 1 2 3; do
    ssh-keyscan -T 10 primary backup >$scan.new 2>/dev/null
    grep -q '^backup ' $scan.new && grep -q '^primary ' $scan.new && break
    sleep 3
  done
  grep -q '^backup ' $scan.new && grep -q '^primary ' $scan.new \
    || { rm -f $scan.new; echo "reset: ssh-keyscan found no host key for primary or backup" >&2; exit 1; }
  # link 2's names reach the same sshd: the same keys (a scan over link 2 would only cost time)
  aliases=$(sed -n 's/^\(primary\|backup\) /\1-2 /p' $scan.new)
  echo "$aliases" >>$scan.new
  mv -f $scan.new $scan
fi
cp -f $scan /root/.ssh/known_hosts
left=(/dev/mapper/!(control))
if ((${#left[@]})); then
  echo "reset: device-mapper devices left: ${left[*]}" >&2
  exit 1
fi
