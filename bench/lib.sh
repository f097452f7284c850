# bench/lib.sh: shell helpers for bench/run and bench/scenarios/* (bash;
# source it: `. "$KVTIER_BENCH_LIB"`).
#
# Every process started with bench_spawn is recorded in $KVTIER_BENCH_PIDS,
# one "PID STARTTIME NAME" line each, so that bench/run can stop whatever a
# scenario left behind. A process is stopped only by its PID and only while
# that PID still has the recorded start time (/proc/PID/stat field 22), so a
# recycled PID is never signalled. Nothing here matches processes by name.

bench_say() { echo "bench: $*" >&2; }
bench_die() { echo "bench: $*" >&2; exit 1; }

# bench_starttime PID: the process's start time in clock ticks since boot.
bench_starttime() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }          # fields from 3 on (the name in field 2 may hold spaces)
  set -- $s
  echo "${20}"         # field 22
}

# bench_gone PID: true when PID has exited (or is a zombie).
bench_gone() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }
  [ "${s%% *}" = Z ]
}

# bench_spawn NAME LOG CMD...: starts CMD in the background with stdout and
# stderr to LOG and stdin from /dev/null, records it, sets BENCH_PID.
bench_spawn() {
  local name=$1 log=$2
  shift 2
  : "${KVTIER_BENCH_PIDS:?bench_spawn needs KVTIER_BENCH_PIDS (set by bench/run)}"
  "$@" >"$log" 2>&1 </dev/null &
  BENCH_PID=$!
  echo "$BENCH_PID $(bench_starttime "$BENCH_PID" || echo 0) $name" >>"$KVTIER_BENCH_PIDS"
}

# bench_stop PID STARTTIME NAME: SIGTERM, up to 10 s to exit, then SIGKILL.
# Does nothing when PID is gone or is no longer the recorded process.
bench_stop() {
  local pid=$1 start=$2 name=$3 i
  bench_gone "$pid" && return 0
  [ "$(bench_starttime "$pid" 2>/dev/null)" = "$start" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    bench_gone "$pid" && break
    sleep 0.1
  done
  if ! bench_gone "$pid"; then
    bench_say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true   # reaps it when it is our child
}

# bench_stop_recorded [FIRST_LINE]: stops every recorded process from line
# FIRST_LINE (default 1) of $KVTIER_BENCH_PIDS on, newest first.
bench_stop_recorded() {
  local from=${1:-1} pid start name
  [ -f "${KVTIER_BENCH_PIDS:-}" ] || return 0
  while read -r pid start name; do
    [ -n "$pid" ] && bench_stop "$pid" "$start" "$name"
  done < <(tail -n +"$from" "$KVTIER_BENCH_PIDS" | tac)
}

# bench_stop_pid PID: stops one process started with bench_spawn.
bench_stop_pid() {
  local pid start name
  while read -r pid start name; do
    [ "$pid" = "$1" ] && bench_stop "$pid" "$start" "$name"
  done <"$KVTIER_BENCH_PIDS"
  return 0
}

# bench_log_tail LOG: the last lines of a log, indented, for an error message.
bench_log_tail() { tail -n 15 "$1" 2>/dev/null | sed 's/^/    /' >&2 || true; }

# bench_start_kvtierd NAME LOG SOCKET KVTIERD-ARGS...: starts kvtierd (from
# $KVTIER_BENCH_BUILD) and waits until it answers Info on SOCKET, at most 30
# s. Sets BENCH_PID. Exits with a message saying what failed otherwise.
bench_start_kvtierd() {
  local name=$1 log=$2 sock=$3 i
  shift 3
  bench_spawn "kvtierd ($name)" "$log" "$KVTIER_BENCH_BUILD/kvtierd" "$@"
  for i in $(seq 300); do
    if bench_gone "$BENCH_PID"; then
      bench_say "kvtierd ($name) exited while starting; its log ($log):"
      bench_log_tail "$log"
      exit 1
    fi
    if "$KVTIER_BENCH_BUILD/kvtier" --socket "$sock" info >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  bench_say "kvtierd ($name) did not answer on $sock within 30 s; its log ($log):"
  bench_log_tail "$log"
  exit 1
}
