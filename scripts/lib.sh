# shellcheck shell=bash
# scripts/lib.sh — shell functions shared by ergon's scripts (sourced, never run):
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Messages: die, lib_note and apt_install_missing prefix their lines with $LIB_NAME (default: the
# script's file name) and write to stderr; each script keeps its own style for everything else.
#
#   script_help FILE                    the comment block at the top of FILE (up to `set -euo`)
#   die MESSAGE...                      "NAME: error: MESSAGE" on stderr, exit 1
#   lib_note MESSAGE...                 "NAME: MESSAGE" on stderr
#   show_log FILE [LINES]               the last LINES (default 30) lines of a log, indented, on
#                                       stderr, after a failure
#   fail LOG MESSAGE...                 show_log LOG, then die MESSAGE (a daemon or a step that
#                                       failed, its log's end just above the error)
#   need_root WHY COMMAND...            die unless root, saying why and how to run COMMAND
#   check_plain_path NAME PATH          die unless PATH is absolute, made of letters, digits and
#                                       ._/+- only, with no . or .. component (it goes into TOML,
#                                       unit files and plugstack.conf lines)
#   wait_until SECONDS COMMAND...       run COMMAND (output discarded) every 0.2 s until it
#                                       succeeds; status 1 when SECONDS pass first
#   close_inherited_fds                 close every descriptor above 2 of this (sub)shell
#   run_clean COMMAND...                run COMMAND with the inherited descriptors closed (for
#                                       anything that starts daemons: a daemon must not keep a
#                                       lock or a caller's pipe open)
#   pid_of PIDFILE                      the pid in PIDFILE (digits only; empty if none)
#   pid_gone PID                        true when PID runs no more (absent, or a zombie)
#   pidfile_alive PIDFILE EXE           the pid in PIDFILE runs EXE: a path (compared with
#                                       /proc/PID/exe) or a bare program name (compared with its
#                                       file name). Guards against a recycled pid
#   start_detached PIDFILE LOG COMMAND...
#                                       start COMMAND in its own session, detached (no inherited
#                                       descriptors, stdin /dev/null, output appended to LOG),
#                                       its pid in PIDFILE; returns once it has exec'd COMMAND
#   stop_pidfile PIDFILE EXE NAME [SECONDS]
#                                       SIGTERM the process of PIDFILE if it runs EXE, wait up to
#                                       SECONDS (default 15; a zombie counts as stopped), then
#                                       SIGKILL; removes PIDFILE. Status 1 when it was not running
#   ensure_user NAME                    create the local user NAME (with a home, bash) if missing
#   find_cargo                          put cargo on PATH (a rustup install of $HOME, /root or
#                                       $SUDO_USER) when it is not; status 1 when there is none
#   apt_install_missing LOG PACKAGE...  install the Debian packages that are not installed
#                                       (apt-get, non-interactive; services the packages would
#                                       start are refused through policy-rc.d); output in LOG,
#                                       its end shown on failure (die)
#
# Never kills by name: processes are found by pid file only.

LIB_NAME=${LIB_NAME:-${0##*/}}

script_help() {
    sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
    printf '%s: error: %s\n' "$LIB_NAME" "$*" >&2
    exit 1
}

lib_note() { printf '%s: %s\n' "$LIB_NAME" "$*" >&2; }

show_log() {
    if [[ ! -s $1 ]]; then
        printf '(%s is empty or missing)\n' "$1" >&2
        return 0
    fi
    printf 'last lines of %s:\n' "$1" >&2
    tail -n "${2:-30}" "$1" | sed 's/^/    /' >&2
}

fail() {
    local log=$1
    shift
    show_log "$log"
    die "$@"
}

need_root() {
    local why=$1
    shift
    [[ $(id -u) -eq 0 ]] || die "must run as root ($why); try: sudo $0 $*"
}

check_plain_path() {
    [[ $2 =~ ^/[A-Za-z0-9._/+-]+$ && $2 != *..* && $2/ != */./* ]] ||
        die "$1 must be an absolute path of letters, digits and ._/+- only, with no . or .. component (got '$2')"
}

wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

close_inherited_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if [[ ! $fd =~ ^[0-9]+$ ]] || ((fd <= 2)); then continue; fi
        { exec {fd}>&-; } 2>/dev/null || true
    done
}

run_clean() { (
    close_inherited_fds
    exec "$@"
); }

pid_of() { [[ -s $1 ]] && tr -dc '0-9' <"$1"; }

pid_gone() {
    [[ -d /proc/$1 ]] || return 0
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]
}

pidfile_alive() {
    local pid exe
    pid=$(pid_of "$1") || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    if [[ $2 == */* ]]; then
        [[ $exe == "$2" ]]
    else
        [[ ${exe##*/} == "$2" ]]
    fi
}

start_detached() {
    local pidfile=$1 log=$2
    shift 2
    (
        close_inherited_fds
        unset JOURNAL_STREAM
        exec setsid "$@" </dev/null >>"$log" 2>&1
    ) &
    local pid=$! want=${1##*/} i exe
    echo "$pid" >"$pidfile"
    # Until the subshell has exec'd the program, /proc/PID/exe is bash (then setsid): wait for
    # the exec, so that a check right after this never mistakes a slow start for an exit.
    for ((i = 0; i < 100; i++)); do
        exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || break
        exe=${exe% (deleted)}
        [[ ${exe##*/} == "$want" ]] && break
        sleep 0.05
    done
}

stop_pidfile() {
    local pidfile=$1 exe=$2 name=$3 limit=${4:-15} pid i
    if ! pidfile_alive "$pidfile" "$exe"; then
        rm -f "$pidfile"
        return 1
    fi
    pid=$(pid_of "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 5; i++)); do
        pid_gone "$pid" && break
        sleep 0.2
    done
    if ! pid_gone "$pid"; then
        lib_note "$name (pid $pid) ignored SIGTERM for $limit s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    return 0
}

ensure_user() {
    id -u "$1" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$1"
}

find_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    local home homes=("${HOME:-/root}" /root)
    [[ -n ${SUDO_USER:-} ]] && homes+=("$(getent passwd "$SUDO_USER" | cut -d: -f6)")
    for home in "${homes[@]}"; do
        [[ -n $home && -x $home/.cargo/bin/cargo ]] || continue
        export PATH=$home/.cargo/bin:$PATH CARGO_HOME=$home/.cargo
        [[ -d $home/.rustup ]] && export RUSTUP_HOME=$home/.rustup
        return 0
    done
    return 1
}

apt_install_missing() {
    local log=$1 missing=() p
    shift
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    lib_note "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >>"$log" 2>&1; then
        show_log "$log"
        die "apt-get update failed (log: $log)"
    fi
    # The packages' postinst scripts may try to start the system's own daemons (munge, MariaDB,
    # Slurm): ergon's scripts run private instances instead, so service starts are refused
    # during the install (policy-rc.d, exit 101).
    local policy=/usr/sbin/policy-rc.d had_policy=0 rc=0
    [[ -e $policy ]] && had_policy=1
    if ((!had_policy)); then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 || rc=$?
    ((had_policy)) || rm -f "$policy"
    if ((rc != 0)); then
        show_log "$log"
        die "apt-get install of ${missing[*]} failed (log: $log)"
    fi
}
