#!/usr/bin/env bash
# A real single-node Slurm cluster for tests, self-contained in one folder (nothing under /etc is changed).
#
#   tests/slurm/cluster.sh start STATE   # STATE: an empty folder; prints `export SLURM_CONF=STATE/slurm.conf`
#   tests/slurm/cluster.sh stop STATE    # stops what start started, by the pids it recorded
#
# Needs root and Debian's packages slurmctld, slurmd, slurm-client and munge (.ci/run installs them). munged
# runs as the munge user with its key and socket in STATE; slurmctld and slurmd run as root with linuxproc
# process tracking and no cgroups (which need systemd), a short credential lifetime so that a requeued job
# starts again within seconds, and the node's real CPUs and memory. It fails, loudly, when the cluster does not
# come up within 60 s, and prints the daemons' logs.
set -euo pipefail

command=${1:?usage: cluster.sh start|stop STATE}
state=${2:?usage: cluster.sh start|stop STATE}

stop() {
    local pids=()
    for name in slurmd slurmctld munged; do
        if [[ -f "$state/run/$name.pid" ]]; then
            pids+=("$(cat "$state/run/$name.pid")")
            rm -f "$state/run/$name.pid"
        fi
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

logs() {
    for log in "$state"/log/*.log; do
        [[ -f "$log" ]] && { echo "--- $log"; tail -n 40 "$log"; }
    done
}

fail() {
    echo "cluster.sh: $*" >&2
    logs >&2
    stop
    exit 1
}

if [[ $command == stop ]]; then
    stop
    exit 0
fi
[[ $command == start ]] || { echo "usage: cluster.sh start|stop STATE" >&2; exit 2; }
[[ $(id -u) == 0 ]] || fail "needs root (munged runs as the munge user, the Slurm daemons as root)"
for tool in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || fail "$tool is not installed (apt-get install slurmctld slurmd slurm-client munge)"
done
export PATH="/usr/sbin:$PATH"

mkdir -p "$state"/{munge,run,log,spool/ctld,spool/d}
chmod 755 "$state" "$state/run" "$state/log"
chown munge:munge "$state/munge"
chmod 755 "$state/munge"  # munged wants its socket folder open to all (the key stays 0600)

# munge: a fresh key, the daemon as its own user, its socket in STATE.
runuser -u munge -- mungekey --create --keyfile="$state/munge/munge.key" --force
runuser -u munge -- munged --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed" \
    || fail "munged did not start"
for _ in $(seq 100); do [[ -S "$state/munge/munge.socket" ]] && break; sleep 0.1; done
cp "$state/munge/munged.pid" "$state/run/munged.pid"
munge -n -S "$state/munge/munge.socket" | unmunge -S "$state/munge/munge.socket" >/dev/null \
    || fail "munge does not work"

# slurm.conf: this host, its real CPUs and memory, one default partition.
host=$(hostname -s)
read -r cpus memory < <(slurmd -C | awk '/^NodeName/ {
    for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "CPUs") c = kv[2]; if (kv[1] == "RealMemory") m = kv[2] }
    print c, m }')
cat > "$state/slurm.conf" <<CONF
ClusterName=fiddler-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ReturnToService=2
MinJobAge=600
KillWait=10
JobRequeue=1
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$state/slurm.conf"

slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
for _ in $(seq 600); do
    node=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
    case $node in
        idle*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
done
fail "the node did not come up idle within 60 s (state: ${node:-none})"
