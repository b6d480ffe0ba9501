#!/bin/bash
# A real two-node cluster on one Linux machine, for megalite's launcher tests (root only).
#
#   tests/cluster/cluster.sh install     apt-get the tools (slurm-wlm munge openmpi pdsh sshd)
#   tests/cluster/cluster.sh up          clean leftovers, then start everything below
#   tests/cluster/cluster.sh on NODE CMD run CMD "on" node1 or node2 (its netns, hostname, hosts)
#   tests/cluster/cluster.sh down        stop everything and remove the namespaces and state
#
# Two "hosts" are network namespaces mgA (node1, 10.200.0.1) and mgB (node2, 10.200.0.2) joined
# by a veth pair; each has its own hostname and /etc/hosts (private mount namespace). Each runs
# an sshd on port 2222 (key auth, a key made here) and a slurmd; node1 also runs slurmctld. munged
# has its own socket under the state directory. Nothing listens outside the namespaces, and only
# 10.200.0.x and loopback carry traffic. Each node declares 2 GPUs to SLURM (gres.conf; each
# "GPU" a /dev/null-like device file), so GPU jobs are accepted and scheduled; there is no CUDA.
# State: $MEGALITE_CLUSTER_DIR (/tmp/megalite-cluster).
set -euo pipefail
D=${MEGALITE_CLUSTER_DIR:-/tmp/megalite-cluster}
NS_A=mgA NS_B=mgB

alive() { [ -e /proc/$1/stat ] && [ "$(awk '{print $3}' /proc/$1/stat)" != Z ]; }
ns_of() { case $1 in node1) echo $NS_A ;; node2) echo $NS_B ;; *) echo "no node $1" >&2; exit 2 ;; esac; }
on() { local h=$1 ns; ns=$(ns_of "$1"); shift
  nsenter --net=/run/netns/$ns unshare --uts --mount sh -c \
    'mount --bind /etc/netns/'$ns'/hosts /etc/hosts; hostname '$h'; exec "$@"' sh "$@"; }

down() {
  local pids="" f
  for f in $D/slurm/slurmctld.pid $D/slurm/slurmd.*.pid $D/ssh/sshd_*.pid $D/munge/munged.pid; do
    [ -f "$f" ] && pids="$pids $(cat "$f")"
  done
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 40); do local a=0; for p in $pids; do alive "$p" && a=1; done; [ $a = 0 ] && break; sleep 0.25; done
  for p in $pids; do alive "$p" && kill -9 "$p" 2>/dev/null || true; done
  # job steps a killed slurmd left behind: anything still running inside our namespaces
  for ns in $NS_A $NS_B; do
    [ -e /run/netns/$ns ] && for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
    rm -rf /etc/netns/$ns
  done
  rm -rf "$D"
}

up() {
  down
  mkdir -p $D/{munge,ssh,slurm/{state,spool,log,tmp/node1,tmp/node2}}
  # munge: private socket, pid and seed files; the package's key
  chown -R munge:munge $D/munge
  runuser -u munge -- /usr/sbin/munged --socket=$D/munge/munge.socket --pid-file=$D/munge/munged.pid \
    --log-file=$D/munge/munged.log --seed-file=$D/munge/munged.seed
  # the two hosts
  ip netns add $NS_A; ip netns add $NS_B
  ip link add mgvA type veth peer name mgvB
  ip link set mgvA netns $NS_A; ip link set mgvB netns $NS_B
  ip -n $NS_A link set mgvA name eth1; ip -n $NS_B link set mgvB name eth1
  ip -n $NS_A addr add 10.200.0.1/24 dev eth1; ip -n $NS_B addr add 10.200.0.2/24 dev eth1
  for ns in $NS_A $NS_B; do
    ip -n $ns link set lo up; ip -n $ns link set eth1 up; mkdir -p /etc/netns/$ns
    printf '127.0.0.1 localhost\n10.200.0.1 node1\n10.200.0.2 node2\n' > /etc/netns/$ns/hosts
  done
  # ssh: a key made here, sshd on port 2222 in each namespace, a client config file
  ssh-keygen -q -t ed25519 -N '' -f $D/ssh/id_ed25519
  ssh-keygen -q -t ed25519 -N '' -f $D/ssh/host_key
  cp $D/ssh/id_ed25519.pub $D/ssh/authorized_keys
  mkdir -p /run/sshd
  for n in node1 node2; do cat > $D/ssh/sshd_$n.config <<EOF
Port 2222
ListenAddress 0.0.0.0
HostKey $D/ssh/host_key
PidFile $D/ssh/sshd_$n.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile $D/ssh/authorized_keys
StrictModes no
AcceptEnv *
EOF
    on $n /usr/sbin/sshd -f $D/ssh/sshd_$n.config -E $D/ssh/sshd_$n.log
  done
  printf 'Host node1 node2\n Port 2222\n User root\n IdentityFile %s\n StrictHostKeyChecking no\n UserKnownHostsFile /dev/null\n LogLevel ERROR\n BatchMode yes\n' \
    $D/ssh/id_ed25519 > $D/ssh/ssh_config
  # SLURM: controller + slurmd on node1, slurmd on node2
  local S=$D/slurm
  cat > $S/slurm.conf <<EOF
ClusterName=megalite
SlurmctldHost=node1(10.200.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
TmpFS=$S/tmp/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
InactiveLimit=0
MinJobAge=5
KillWait=3
GresTypes=gpu
NodeName=node1 NodeAddr=10.200.0.1 CPUs=2 RealMemory=2000 Gres=gpu:2
NodeName=node2 NodeAddr=10.200.0.2 CPUs=2 RealMemory=2000 Gres=gpu:2
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # Both nodes say they have 2 GPUs, so a real sbatch accepts and schedules a GPU request; CPU
  # jobs ask for none and run as before. Nothing here has CUDA. slurmd 22.05 drops a GPU with no
  # File= ("Removing file-less GPU"), so each "GPU" is a character device like /dev/null (1,3)
  # under the state directory: inert, no driver behind it.
  mkdir -p $D/gpu; for i in 0 1; do mknod -m 0666 $D/gpu/gpu$i c 1 3; done
  echo "Name=gpu Count=2 File=$D/gpu/gpu[0-1]" > $S/gres.conf
  on node1 env SLURM_CONF=$S/slurm.conf sh -c 'slurmctld && slurmd -N node1'
  on node2 env SLURM_CONF=$S/slurm.conf slurmd -N node2
  for _ in $(seq 1 120); do
    [ "$(on node1 env SLURM_CONF=$S/slurm.conf sinfo -h -N -o %T 2>/dev/null | grep -c '^idle')" = 2 ] && { echo "cluster up"; return 0; }
    sleep 0.25
  done
  echo "cluster: SLURM nodes not idle after 30 s" >&2; on node1 env SLURM_CONF=$S/slurm.conf sinfo -N >&2 || true; return 1
}

install() {
  local need=""
  command -v sbatch >/dev/null || need="$need slurm-wlm"
  command -v munged >/dev/null || [ -x /usr/sbin/munged ] || need="$need munge"
  command -v mpirun >/dev/null || need="$need openmpi-bin libopenmpi-dev"
  command -v pdsh >/dev/null || need="$need pdsh"
  [ -x /usr/sbin/sshd ] || need="$need openssh-server"
  command -v ssh >/dev/null || need="$need openssh-client"
  command -v nsenter >/dev/null || need="$need util-linux"
  command -v ip >/dev/null || need="$need iproute2"
  [ -z "$need" ] && { echo "cluster tools already installed"; return 0; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down; echo "cluster down" ;;
  on) shift; on "$@" ;;
  *) echo "usage: $0 install|up|down|on NODE CMD..." >&2; exit 2 ;;
esac
