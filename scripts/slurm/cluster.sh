#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, with accounting, for tests.
#
#   bash scripts/slurm/cluster.sh up STATE_DIR     # install (Debian, root), start, wait until ready
#   bash scripts/slurm/cluster.sh down STATE_DIR   # stop what `up` started (by PID), keep STATE_DIR
#
# Debian 12's packages (Slurm 22.05, MUNGE, MariaDB); no systemd needed: the
# daemons run in the foreground of background processes whose PIDs are kept
# in STATE_DIR/pids and stopped by PID, last started first.
#
# The configuration lives in STATE_DIR (STATE_DIR/slurm.env exports
# SLURM_CONF). While the cluster is up, /etc/slurm/slurm.conf is a link to it:
# the SLURM executor plugin runs `srun` inside every job with SLURM_*
# variables removed, so srun must find the configuration at its default
# place. `down` removes the link: with no configuration, Slurm's client tools
# fail at once, whereas against a configured but stopped controller every
# Snakemake start would wait 10 s (the plugin calls `scontrol show config`).
#
# Ports are free ones picked at start, so that two clusters (or a site's own
# MariaDB) do not collide. Without cgroups (containers, sandboxes):
# proctrack/linuxproc and task/none; accounting through slurmdbd and MariaDB,
# so that `sacct` (the plugin's default status command) works.
set -euo pipefail

action=${1:-}
state=${2:-}
if [ -z "$action" ] || [ -z "$state" ]; then
    echo "usage: bash scripts/slurm/cluster.sh {up|down} STATE_DIR" >&2
    exit 2
fi
mkdir -p "$state"
state=$(cd "$state" && pwd)
pids="$state/pids"
cluster=dc2test
node=dc2node
etc_conf=/etc/slurm/slurm.conf

log() { echo "slurm-cluster: $*" >&2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Start "$@" in the background, record NAME PID, and return.
start() {
    local name=$1
    shift
    "$@" >"$state/log/$name.out" 2>&1 &
    echo "$name $!" >>"$pids"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${seconds}s waiting for $what; logs in $state/log"
            tail -n 20 "$state"/log/*.log "$state"/log/*.out >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.5
    done
}

install_packages() {
    local packages="slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
    local missing=""
    for p in $packages; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "needs root and apt-get to install:$missing"
        exit 3
    fi
    log "installing$missing"
    # Packages must not start their services (no systemd here; this cluster
    # runs its own daemons on its own ports): policy-rc.d says no, for the
    # time of the installation, unless the machine already has one.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    local status=0
    {
        apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o DPkg::Lock::Timeout=300 $missing
    } >"$state/log/apt.out" 2>&1 || status=$?
    [ -n "$added_policy" ] && rm -f "$policy"
    if [ $status != 0 ]; then
        tail -n 20 "$state/log/apt.out" >&2
        exit $status
    fi
}

write_configs() {
    local ctld_port=$1 slurmd_port=$2 dbd_port=$3 db_port=$4 db_pass=$5
    local cpus memory_mb
    cpus=$(nproc)
    # A little under the machine's memory: slurmd drains a node whose real
    # memory is below the configured one.
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)
    mkdir -p "$state/spool/ctld" "$state/spool/d"
    cat >"$state/slurm.conf" <<EOF
# Written by scripts/slurm/cluster.sh: one node, this machine, for tests.
ClusterName=$cluster
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$state/munge.socket
CredType=cred/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers and sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes (squeue status mode needs >= 120 s).
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# sacct shows the comment the SLURM executor plugin gives each job (its rule).
AccountingStoreFlags=job_comment
# With slurmdbd, this "password" is the MUNGE socket for talking to it.
AccountingStoragePass=$state/munge.socket
MpiDefault=none
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$state/slurmdbd.conf" <<EOF
# Written by scripts/slurm/cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$state/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$state/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$state/slurmdbd.conf"
    cat >"$state/slurm.env" <<EOF
export SLURM_CONF=$state/slurm.conf
EOF
}

# True if process $1 runs. The daemons' parent (`up`) has exited, so a stopped
# daemon may linger as a zombie until the machine's init reaps it: not running.
running() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$stat" ] && [ "${stat#Z}" = "$stat" ]
}

# True if the cluster whose slurm.conf is $1 still has a live daemon.
cluster_alive() {
    local other_pids
    other_pids="$(dirname "$1")/pids"
    [ -s "$other_pids" ] || return 1
    while read -r _ pid; do
        running "$pid" && return 0
    done <"$other_pids"
    return 1
}

link_etc_conf() {
    if [ -e "$etc_conf" ] || [ -L "$etc_conf" ]; then
        local target
        target=$(readlink "$etc_conf" || true)
        if [ -z "$target" ]; then
            log "$etc_conf exists and is not ours: this machine has a SLURM configuration"
            exit 1
        elif cluster_alive "$target"; then
            log "another test cluster is up ($etc_conf -> $target); run its 'down' first"
            exit 1
        fi
        rm -f "$etc_conf"  # left behind by a cluster that is gone
    fi
    mkdir -p "$(dirname "$etc_conf")"
    ln -s "$state/slurm.conf" "$etc_conf"
}

up() {
    if [ -s "$pids" ]; then
        log "$pids exists: already up? run 'down' first"
        exit 1
    fi
    mkdir -p "$state/log"
    install_packages
    local ctld_port slurmd_port dbd_port db_port db_pass
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    dbd_port=$(free_port)
    db_port=$(free_port)
    db_pass=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    write_configs "$ctld_port" "$slurmd_port" "$dbd_port" "$db_port" "$db_pass"
    export SLURM_CONF="$state/slurm.conf"
    link_etc_conf
    : >"$pids"

    # MUNGE: its own key and socket.
    mkdir -p "$state/munge"
    chmod 700 "$state/munge"
    dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$state/munge/munge.key"
    start munged munged --foreground --force --key-file="$state/munge/munge.key" \
        --socket="$state/munge.socket" --pid-file="$state/munge/munged.pid" \
        --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"
    wait_for 20 munged munge --socket="$state/munge.socket" -n

    # MariaDB for accounting: a private data directory, TCP on 127.0.0.1 only.
    mariadb-install-db --datadir="$state/mysql" --user=root --skip-test-db \
        --auth-root-authentication-method=socket >"$state/log/mariadb-install.out" 2>&1
    start mariadbd mariadbd --no-defaults --datadir="$state/mysql" --user=root \
        --socket="$state/mysql.sock" --port="$db_port" --bind-address=127.0.0.1 \
        --pid-file="$state/mysql.pid" --log-error="$state/log/mariadb.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M
    wait_for 60 mariadbd mariadb --no-defaults --socket="$state/mysql.sock" -u root -e 'select 1'
    mariadb --no-defaults --socket="$state/mysql.sock" -u root <<EOF
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

    start slurmdbd slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -i list cluster
    sacctmgr -i add cluster "$cluster" >/dev/null
    start slurmctld slurmctld -D -i
    wait_for 60 slurmctld scontrol ping
    start slurmd slurmd -D -N "$node"
    wait_for 60 "node $node idle" bash -c "sinfo -h -n $node -o %t | grep -qx idle"
    log "up: SLURM_CONF=$SLURM_CONF (source $state/slurm.env)"
}

down() {
    [ -s "$pids" ] || { log "nothing recorded in $pids"; return 0; }
    export SLURM_CONF="$state/slurm.conf"
    # Jobs first, while slurmd can still end their steps.
    if timeout 10 scontrol ping >/dev/null 2>&1; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo $jobs)"
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 40); do
                [ -z "$(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    # Last started first: slurmd, slurmctld, slurmdbd, MariaDB, munged.
    tac "$pids" | while read -r name pid; do
        if running "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do
                running "$pid" || break
                sleep 0.25
            done
            if running "$pid"; then
                log "$name ($pid) ignored SIGTERM; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    done
    : >"$pids"
    if [ "$(readlink "$etc_conf" 2>/dev/null || true)" = "$state/slurm.conf" ]; then
        rm -f "$etc_conf"
    fi
    log "down"
}

case "$action" in
    up) up ;;
    down) down ;;
    *)
        echo "usage: bash scripts/slurm/cluster.sh {up|down} STATE_DIR" >&2
        exit 2
        ;;
esac
