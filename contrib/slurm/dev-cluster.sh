#!/usr/bin/env bash
# A real Slurm (Debian's slurm-wlm, 22.05) cluster on one host, loopback only, for crunchgate's
# development, tests and benchmarks.
#
#   contrib/slurm/dev-cluster.sh start    install packages if missing, start munged, slurmctld
#                                         and four slurmd, wait until every node is idle
#   contrib/slurm/dev-cluster.sh stop     cancel our jobs, stop the daemons this script started
#                                         (by the PIDs in its own pid files, nothing else)
#   contrib/slurm/dev-cluster.sh status   daemons, nodes, job count; exit 0 only if all is up
#   contrib/slurm/dev-cluster.sh env      print `export SLURM_CONF=...` for `eval`
#   contrib/slurm/dev-cluster.sh ctld-stop | ctld-start
#                                         stop / restart only slurmctld, keeping its job state
#                                         (fault-injection tests: "the controller is down")
#
# Everything lives under $CRUNCHGATE_SLURM_DIR (default /tmp/crunchgate-slurm): etc/slurm.conf
# (point SLURM_CONF at it, or source $DIR/env), its own munge key and socket, state, logs, pid
# files. Nothing in /etc is touched, and a system Slurm or munged, if any, is left alone.
#
# Cluster layout:
#   n1, n2   CPUs=4   RealMemory=8000   TmpDisk=20000   Features=instancetype=small
#   n3, n4   CPUs=16  RealMemory=64000  TmpDisk=100000  Features=instancetype=large  Gres=gpu:2
#   partitions: compute (default, n[1-4]), big (n[3-4]), and parked (n[1-4], State=DOWN: jobs queue
#   there with a real priority but never start -- the benchmark's steady-state queue)
# Resources are overstated on purpose (SlurmdParameters=config_overrides): the host has 2 cores.
# Priority: priority/multifactor with only a partition weight, so priority = weight - nice and
# renicing a job moves its priority one for one, as on a production cluster.
#
# Knobs (environment):
#   CRUNCHGATE_SLURM_DIR           state directory                       [/tmp/crunchgate-slurm]
#   CRUNCHGATE_SLURM_PORT          slurmctld port; slurmd use PORT+1..+4 [16817]
#   CRUNCHGATE_SLURM_MIN_JOB_AGE   seconds an ended job stays in squeue  [300]
#   CRUNCHGATE_SLURM_MAX_JOBS      MaxJobCount (bench queues 10,000)     [30000]
#   CRUNCHGATE_SLURM_TIMEOUT       seconds to wait for idle nodes        [60]
#   CRUNCHGATE_SLURM_INSTALL       0 = never run apt-get                 [1]
set -euo pipefail

DIR=${CRUNCHGATE_SLURM_DIR:-/tmp/crunchgate-slurm}
PORT=${CRUNCHGATE_SLURM_PORT:-16817}
MIN_JOB_AGE=${CRUNCHGATE_SLURM_MIN_JOB_AGE:-300}
MAX_JOBS=${CRUNCHGATE_SLURM_MAX_JOBS:-30000}
TIMEOUT=${CRUNCHGATE_SLURM_TIMEOUT:-60}
NODES=(n1 n2 n3 n4)
ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log SPOOL=$DIR/spool MUNGE=$DIR/munge
CONF=$ETC/slurm.conf
SOCKET=$MUNGE/munge.socket
export SLURM_CONF=$CONF

die() { echo "dev-cluster.sh: $*" >&2; exit 1; }

# A pid is ours and alive if it exists and is not a zombie (this VM's PID 1 reaps orphaned
# daemons late, so kill -0 alone would report a dead slurmd as alive).
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
pidfile_alive() { [ -s "$1" ] && pid_alive "$(cat "$1")"; }

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds or time runs out.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.1
    done
}

install_packages() {
    local missing=()
    for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null || missing+=("$c"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "${CRUNCHGATE_SLURM_INSTALL:-1}" = 1 ] \
        || die "missing ${missing[*]}; install with: apt-get install slurm-wlm munge"
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or: sudo apt-get install slurm-wlm munge"
    echo "dev-cluster.sh: installing slurm-wlm and munge" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    install -d -m 700 "$MUNGE"
    if [ ! -s "$MUNGE/munge.key" ]; then
        # A key of our own: the system munged (if any) and its key are not ours to touch.
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE/munge.key" --force >/dev/null 2>&1
        else
            dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
        fi
        chmod 400 "$MUNGE/munge.key"
    fi
    if ! pidfile_alive "$RUN/munged.pid"; then
        rm -f "$RUN/munged.pid" "$SOCKET" "$SOCKET.lock"
        # --force: munged refuses a socket directory under world-writable /tmp otherwise.
        munged --force --socket="$SOCKET" --key-file="$MUNGE/munge.key" \
            --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
            --seed-file="$MUNGE/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 \
            || die "munged did not start; see $LOG/munged.log"
    fi
    wait_for 10 sh -c "munge -S '$SOCKET' -n </dev/null | unmunge -S '$SOCKET'" \
        || die "munge does not work; see $LOG/munged.log"
}

# Fake GPUs: gres/gpu needs File= naming character devices. Clones of /dev/null do (they are
# never opened with task/none). Without mknod rights the cluster runs without GRES.
make_gres() {
    local gres_line=""
    mkdir -p "$RUN/fakegpu"
    for i in 0 1; do
        [ -c "$RUN/fakegpu/nvidia$i" ] || mknod -m 666 "$RUN/fakegpu/nvidia$i" c 1 3 2>/dev/null || true
    done
    if [ -c "$RUN/fakegpu/nvidia0" ] && [ -c "$RUN/fakegpu/nvidia1" ]; then
        echo "NodeName=n[3-4] Name=gpu File=$RUN/fakegpu/nvidia[0-1]" >"$ETC/gres.conf"
        gres_line="Gres=gpu:2"
    else
        : >"$ETC/gres.conf"
    fi
    echo "$gres_line"
}

write_conf() {
    local host gres comm
    host=$(hostname -s)
    gres=$(make_gres)
    # NoInAddrAny makes slurmd bind 127.0.0.1 rather than 0.0.0.0, but then slurmd resolves the
    # hostname and fails to bind if it does not resolve to loopback: use it only when it does.
    if getent hosts "$(hostname)" | awk '{print $1}' | grep -q '^127\.'; then
        comm="CommunicationParameters=NoInAddrAny"
    else
        comm="# CommunicationParameters=NoInAddrAny: hostname does not resolve to 127.x"
    fi
    cat >"$CONF.new" <<EOF
# Generated by crunchgate contrib/slurm/dev-cluster.sh -- single host, loopback only.
ClusterName=crunchgate
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
$comm
SlurmctldPort=$PORT
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# jobcomp/filetxt: 'sacct -c' can still tell how an old job ended.
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Slurm's default batch_sched_delay=3 leaves a trivial job PENDING for seconds.
SchedulerParameters=batch_sched_delay=0
PriorityType=priority/multifactor
PriorityWeightPartition=10000000
PriorityWeightAge=0
PriorityWeightFairshare=0
PriorityWeightJobSize=0
PriorityWeightQOS=0
DefMemPerCPU=100
EnforcePartLimits=NO
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
# Ended jobs stay visible to 'squeue -t all' this long: crunchgate reads how a job ended there.
MinJobAge=$MIN_JOB_AGE
MaxJobCount=$MAX_JOBS
InactiveLimit=0
GresTypes=gpu
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=4 RealMemory=8000 TmpDisk=20000 Features=instancetype=small State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=4 RealMemory=8000 TmpDisk=20000 Features=instancetype=small State=UNKNOWN
NodeName=n3 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 3)) CPUs=16 RealMemory=64000 TmpDisk=100000 Features=instancetype=large $gres State=UNKNOWN
NodeName=n4 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 4)) CPUs=16 RealMemory=64000 TmpDisk=100000 Features=instancetype=large $gres State=UNKNOWN
PartitionName=compute Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP
PartitionName=big Nodes=n[3-4] MaxTime=INFINITE State=UP
PartitionName=parked Nodes=n[1-4] MaxTime=INFINITE State=DOWN
EOF
    if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; return 1; fi
    mv "$CONF.new" "$CONF"
    return 0
}

all_nodes_idle() {
    # one line per node and partition; idle/mix/alloc are usable, idle*/unk*/down* are not yet
    local ok
    ok=$(sinfo --noheader --Node --format='%N %t' 2>/dev/null | sort -u \
        | awk '$2 ~ /^(idle|mix|alloc)$/ {print $1}' | sort -u | wc -l)
    [ "$ok" -ge ${#NODES[@]} ]
}

cmd_start() {
    install_packages
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL/ctld"
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL/$n"; done
    start_munge
    local changed=0
    write_conf && changed=1
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env"

    if ! pidfile_alive "$RUN/slurmctld.pid"; then
        rm -f "$RUN/slurmctld.pid"
        # -c: a fresh start forgets old jobs (job ids restart at 1); -i: ignore unreadable state
        rm -rf "${SPOOL:?}/ctld/"*
        : >"$LOG/jobcomp.log"
        slurmctld -c -i </dev/null || die "slurmctld did not start; see $LOG/slurmctld.log"
    elif [ "$changed" = 1 ]; then
        scontrol reconfigure
    fi
    wait_for 30 scontrol ping || { tail -n 20 "$LOG/slurmctld.log" >&2; die "slurmctld not answering"; }
    for n in "${NODES[@]}"; do
        if ! pidfile_alive "$RUN/slurmd-$n.pid"; then
            rm -f "$RUN/slurmd-$n.pid"
            slurmd -N "$n" </dev/null || die "slurmd $n did not start; see $LOG/slurmd-$n.log"
        fi
    done
    if ! wait_for "$TIMEOUT" all_nodes_idle; then
        sinfo --Node >&2 || true
        tail -n 20 "$LOG/slurmctld.log" >&2 || true
        die "nodes not idle after ${TIMEOUT}s"
    fi
    echo "dev-cluster.sh: Slurm is up; use it with: export SLURM_CONF=$CONF" >&2
}

# stop_pids PID [TERM]: wait briefly for a clean exit (or send TERM at once when asked), then
# TERM, then KILL -- only the given PID.
stop_pids() {
    local sig p left still first=none
    [ "${2:-}" = TERM ] && { first=TERM; set -- "$1"; }
    for sig in $first TERM KILL; do
        left=()
        for p in "$@"; do pid_alive "$p" && left+=("$p"); done
        [ ${#left[@]} -eq 0 ] && return 0
        [ "$sig" != none ] && kill -s "$sig" "${left[@]}" 2>/dev/null
        for _ in $(seq 100); do
            still=0
            for p in "${left[@]}"; do pid_alive "$p" && still=1; done
            [ "$still" = 0 ] && break
            sleep 0.1
        done
    done
}

cmd_stop() {
    local pids=() f
    [ -f "$CONF" ] || { echo "dev-cluster.sh: nothing to stop in $DIR" >&2; return 0; }
    for f in "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid; do
        [ -s "$f" ] && pids+=("$(cat "$f")")
    done
    if pidfile_alive "$RUN/slurmctld.pid"; then
        # Every job in this cluster was submitted to our own slurmctld: cancel them all and give
        # running ones KillWait to end, so no job step outlives its slurmd.
        scancel --quiet --full --user=root 2>/dev/null || true
        squeue --noheader --all --format=%A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        wait_for 15 sh -c '[ -z "$(squeue --noheader --all --states=R,CG,CF,S --format=%A)" ]' || true
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    [ ${#pids[@]} -gt 0 ] && stop_pids "${pids[@]}"
    rm -f "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid
    if pidfile_alive "$RUN/munged.pid"; then
        stop_pids "$(cat "$RUN/munged.pid")"
    fi
    rm -f "$RUN/munged.pid"
    echo "dev-cluster.sh: stopped" >&2
}

cmd_ctld_stop() {
    pidfile_alive "$RUN/slurmctld.pid" || return 0
    stop_pids "$(cat "$RUN/slurmctld.pid")" TERM
}

cmd_ctld_start() {
    pidfile_alive "$RUN/slurmctld.pid" && return 0
    rm -f "$RUN/slurmctld.pid"
    # no -c: recover the saved job state, as a production slurmctld restart would
    slurmctld -i </dev/null || die "slurmctld did not start; see $LOG/slurmctld.log"
    wait_for 30 scontrol ping || die "slurmctld not answering"
}

cmd_status() {
    local rc=0 f n
    [ -f "$CONF" ] || { echo "not configured ($CONF missing)"; return 1; }
    for f in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if pidfile_alive "$RUN/$f.pid"; then echo "$f: running (pid $(cat "$RUN/$f.pid"))"
        else echo "$f: stopped"; rc=1; fi
    done
    if [ $rc = 0 ]; then
        sinfo || rc=1
        n=$(squeue --noheader --all --format=%A 2>/dev/null | wc -l)
        echo "jobs in queue: $n"
    fi
    echo "SLURM_CONF=$CONF"
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    ctld-stop) cmd_ctld_stop ;;
    ctld-start) cmd_ctld_start ;;
    env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
    *) echo "usage: $0 start|stop|status|env|ctld-stop|ctld-start" >&2; exit 2 ;;
esac
