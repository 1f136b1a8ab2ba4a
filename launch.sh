#!/usr/bin/env bash
#
# launch.sh: starts mae_jax runs on Cloud TPU VMs (gcloud), on SLURM GPU clusters (sbatch), or
# as one multi-process JAX job on this machine's CPU. `launch.sh --help` documents everything;
# tests/test_launch.py checks it against fake gcloud / sbatch / srun executables.
#
# Every command this script would run on a real system goes through run_cmd, which prints it
# (shell-quoted, ready to paste) instead under --dry-run.

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR
readonly PROG="launch.sh"
readonly DEFAULT_MODULE="mae_jax.main"
readonly DEFAULT_TPU_VERSION="tpu-ubuntu2204-base"
readonly DEFAULT_LOG="~/mae_jax.log"
readonly LIBTPU_URL="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# pgrep/pkill -f pattern for the entrypoint processes on a TPU worker. It is anchored at the
# start of the command line: the remote shell that runs our --command has the same words
# ("python3 -m mae_jax...") further along in its own command line, and an unanchored pattern
# would make `tpu stop` kill that shell and `tpu run` think mae_jax is already running. It
# contains no single quote, so it can be single-quoted in remote commands.
readonly ENTRYPOINT_PATTERN='^[^ ]*python[0-9.]* -m mae_jax'
readonly HEREDOC_END="MAE_JAX_SBATCH_EOF"

DRY_RUN=0
ARGS=()        # Words before `--`, without the global options.
PY_ARGS=()     # Words after `--`: the entrypoint's arguments.
HAVE_PY_ARGS=0
declare -A OPT=()   # Parsed options of the subcommand: OPT[--name]=value, flags are 1.
POSITIONAL=()
SUBCOMMAND=""

#######################################
# Messages and usage.
#######################################

err() {
  printf '%s: %s\n' "${PROG}" "$*" >&2
}

# Prints an error and exits 1 (a failure that is not a usage error).
die() {
  err "error: $*"
  exit 1
}

usage_short() {
  cat <<EOF
usage: ${PROG} [--dry-run] tpu {create|setup|run|tail|stop|delete} --name NAME --zone ZONE
                 [options] [-- ARGS]
       ${PROG} [--dry-run] slurm --nodes N --gpus-per-node G [options] -- ARGS
       ${PROG} [--dry-run] local N [options] -- ARGS
       ${PROG} --help          (full documentation)
EOF
}

# Prints an error and the short usage to stderr, and exits 2.
die_usage() {
  err "error: $*"
  usage_short >&2
  exit 2
}

usage_full() {
  cat <<'EOF'
launch.sh: run mae_jax on Cloud TPU VMs, on SLURM GPU clusters, or as a multi-process JAX job
on this machine's CPU.

USAGE
  launch.sh [--dry-run] tpu ACTION --name NAME --zone ZONE [--project P] [options] [-- ARGS]
  launch.sh [--dry-run] slurm --nodes N --gpus-per-node G [options] -- ARGS
  launch.sh [--dry-run] local N [options] -- ARGS
  launch.sh --help | -h | help

  ARGS, everything after a literal `--`, go unchanged to the Python entrypoint:
      python -m MODULE ARGS          (MODULE: --module, default mae_jax.main)
  for example  -- --config configs/pretrain.py:poster --workdir gs://bucket/run1
  The task (pretraining, fine-tuning, evaluation) comes from the config file; the study is
  --module mae_jax.trainers.study. Options take their value as `--opt VALUE` or `--opt=VALUE`;
  a value with a control character (a newline, a tab...) is refused.

GLOBAL OPTIONS (anywhere before `--`)
  --dry-run    Print every command instead of running it, shell-quoted so that it can be
               copied and pasted. Nothing is created, copied, submitted or started.
  -h, --help   Print this text.

CLOUD TPU VMs: launch.sh tpu ACTION --name NAME --zone ZONE [--project P] ...
  Every action runs `gcloud compute tpus ...` (install and log in to the gcloud CLI first).
    --name NAME     the TPU VM, and for --queued the queued resource. Required.
    --zone ZONE     e.g. us-central2-b. Required.
    --project P     Google Cloud project, appended as --project=P (default: gcloud's).

  tpu create --type TYPE [--version V] [--spot] [--queued [--wait]]
      On demand (returns when the TPU VM is READY):
        gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE
            --version=V [--spot]
      --type TYPE   accelerator type: v4-8, v4-32, v5p-64, v6e-16, ... Required.
      --version V   TPU software version. Default tpu-ubuntu2204-base (v4 and older); use
                    v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e
                    for v6e.
      --spot        Spot capacity: much cheaper, preemptible at any time (mae_jax then gets
                    SIGTERM, saves a checkpoint and stops; `tpu run` again to resume).
      --queued      Ask for a queued resource instead, which waits for capacity:
                      gcloud compute tpus queued-resources create NAME --node-id=NAME
                          --zone=ZONE --accelerator-type=TYPE --runtime-version=V [--spot]
                    `gcloud compute tpus queued-resources describe NAME --zone=ZONE` shows
                    its state; the TPU VM exists and can be set up once it is ACTIVE.
      --wait        With --queued: check that state every LAUNCH_POLL_SECONDS (30) seconds
                    until it is ACTIVE (exit 0), FAILED or SUSPENDED (exit 1).

  tpu setup [--jax-version V] [--python PY]
      Copies this checkout to every worker and installs it there:
        1. packs the files git lists (tracked ones, and untracked ones that are not
           ignored, as `git status` shows them) into a temporary .tar.gz;
        2. gcloud compute tpus tpu-vm scp TARBALL NAME:~/mae_jax.tar.gz --zone=ZONE
               --worker=all
        3. gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...
           which, on every worker, unpacks it into ~/mae_jax (over an earlier copy: files
           deleted here stay there), checks the Python version, and runs
             PY -m pip install -r requirements.txt -c requirements-lock.txt 'jax[tpu]==V'
                 -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
             PY -m pip install --no-deps -e .
      --jax-version V  Default: the jax pin of requirements.txt (0.10.2), which the lock
                       file pins too. Another version drops the jax / jaxlib pins from both
                       files (into requirements-tpu.txt, requirements-lock-tpu.txt there).
      --python PY      The workers' interpreter, default python3. JAX 0.10 needs Python
                       >= 3.11; tpu-ubuntu2204-base ships 3.10, so install a newer Python on
                       the workers first and name it here (and in `tpu run`).
      Run setup again after changing code.

  tpu run [--module M] [--log FILE] [--python PY] -- ARGS
      One `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...`
      that runs on every worker, in ~/mae_jax:
        nohup PY -m M ARGS > FILE 2>&1 < /dev/null &
      Detached, so a dropped ssh connection does not stop the run. JAX finds the other
      workers of a multi-host TPU slice by itself: no coordinator settings are needed.
      ARGS must contain --workdir gs://... (or --workdir=gs://...): every worker reads and
      writes the same checkpoints, so a local path is refused (exit 2). Put the dataset
      on gs:// too. A worker where mae_jax is already running refuses to start another.
      --module M    Default mae_jax.main.
      --log FILE    On each worker; default ~/mae_jax.log. Quote a ~ so that your own shell
                    does not expand it; a relative path is relative to ~/mae_jax.
      --python PY   Default python3.

  tpu tail [--worker W] [--log FILE]
      Follows one worker's log: ssh --worker=W (default 0) `tail -n 100 -F FILE`.
      Ctrl-C stops following; the run goes on.

  tpu stop
      ssh --worker=all, `pkill -TERM` of the mae_jax python processes. SIGTERM makes
      training save a checkpoint at the next step and exit 0; `tpu run` with the same
      --workdir resumes from it. Workers where nothing runs are not an error.

  tpu delete [--queued]
      gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet, or with --queued
      gcloud compute tpus queued-resources delete NAME --zone=ZONE --force --quiet
      (--force deletes the queued resource's TPU VM with it).

SLURM: launch.sh slurm --nodes N --gpus-per-node G [options] -- ARGS
  Writes an sbatch script, then runs `sbatch SCRIPT`. The job runs one task per GPU:
      srun --kill-on-bad-exit=1 python -m M ARGS
  JAX's SLURM detection gives every task its coordinator (the first node), process id and
  GPU (SLURM_LOCALID) from the SLURM_* variables srun sets. --kill-on-bad-exit=1 ends all
  tasks as soon as one fails, instead of leaving them waiting in a collective. The job
  inherits the environment of the shell that submits it (sbatch's default), so activate
  the virtualenv first; PYTHON replaces `python`. The workdir and dataset must be on a
  filesystem every node sees.
  Stopping and resuming: the script asks SLURM for SIGTERM 120 s before the time limit
  (--signal=B:TERM@120) and passes it on to srun once; mae_jax then saves a checkpoint at
  the next step and exits 0. --requeue lets SLURM requeue the job after a preemption or a
  node failure, and the job resumes from the workdir's latest checkpoint. A job that
  reached its time limit is not requeued: submit the same command again to go on.
    --nodes N            Nodes. Required.
    --gpus-per-node G    GPUs per node, and so tasks per node; TYPE:G (e.g. a100:8) asks
                         for a GPU type. Required.
    --partition P        #SBATCH --partition.
    --time HH:MM:SS      #SBATCH --time (the partition's default otherwise); any SLURM
                         form: MINUTES, HH:MM:SS, DAYS-HH[:MM[:SS]], UNLIMITED.
    --account A          #SBATCH --account. P and A may not hold whitespace, quotes, '\'
                         or '#', which sbatch would not read literally there.
    --job-name NAME      Default mae_jax.
    --cpus-per-task C    CPU cores per task (input pipeline threads); default 8.
    --module M           Default mae_jax.main.
    --script-dir DIR     Default ./slurm. The script is DIR/NAME-YYYYmmdd-HHMMSS.sbatch, the
                         job's output DIR/NAME-JOBID.out (appended to across requeues).
                         DIR (and the current directory, the job's --chdir) may hold spaces:
                         they are quoted for sbatch; DIR may not hold '\'.
  Under --dry-run nothing is written or submitted: it prints a shell snippet (mkdir -p,
  cat > SCRIPT <<'EOF' ... EOF, sbatch SCRIPT) that does what launch.sh would do.

LOCAL: launch.sh local N [--devices-per-process D] [--port P] [--module M] [--log-dir DIR]
                        -- ARGS
  Starts N processes of `$PYTHON -m M ARGS` on this machine that form ONE JAX job over CPU
  devices (to try multi-process code without a cluster). Process i gets the environment
    JAX_PLATFORMS=cpu
    XLA_FLAGS="<$XLA_FLAGS less its device count> --xla_force_host_platform_device_count=D"
    JAX_COORDINATOR_ADDRESS=localhost:P  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
    PYTHONUNBUFFERED=1   (output appears as it is written)
  and stdin from /dev/null. Process 0 writes to this terminal; every other process writes
  there too, each line prefixed with "[process i] ". With --log-dir, each process's output
  also goes, without the prefix, to DIR/process_i.log (process 0 included). Prefixed and
  logged output has stderr merged into stdout.
    --devices-per-process D   CPU devices per process; default 4.
    --port P                  Coordinator port; default a free one, asked of the OS.
    --module M                Default mae_jax.main.
    --log-dir DIR             Also write each process's output to DIR/process_i.log
                              (created; existing logs are overwritten).
  What launch.sh does while they run:
    * A process exits non-zero: the others are killed at once (SIGKILL: they would wait
      in a collective for it forever); launch.sh names the process and exits with its code.
    * launch.sh gets SIGTERM, SIGINT (Ctrl-C) or SIGHUP: it sends SIGTERM to every process
      (each saves a checkpoint and stops), waits for them, and exits with the first
      non-zero status, or 0. The processes run in their own process groups, so Ctrl-C
      reaches them only this way, once. A second Ctrl-C sends a second SIGTERM, which
      mae_jax takes as "stop now, without saving".
    * All exit 0: launch.sh exits 0.
  Needs bash >= 5.1 (for `wait -n -p`). Under --dry-run it prints the N commands with
  their environment (run each in its own terminal); the free port is still looked up.

ENVIRONMENT
  PYTHON               local: the interpreter (default REPO/.venv/bin/python if it exists,
                       else python3). slurm: the interpreter written into the script
                       (default python, found on the job's PATH).
  XLA_FLAGS            local: passed on to the processes, except its
                       --xla_force_host_platform_device_count, which D replaces.
  LAUNCH_POLL_SECONDS  tpu create --queued --wait: seconds between state checks (default 30).
  TMPDIR               tpu setup: where the temporary tarball is made (default /tmp).
  PATH                 where gcloud, sbatch, git and tar are found.

EXIT STATUS
  0 on success; 2 for a usage error (unknown subcommand or option, missing or bad value);
  for local, the exit code of the first process that failed; otherwise the status of the
  command that failed (1 for launch.sh's own errors, e.g. a queued resource that FAILED).

EXAMPLES
  # A v4-32 slice (4 workers) on spot capacity, from creation to deletion:
  ./launch.sh tpu create --name mae --zone us-central2-b --type v4-32 --spot
  ./launch.sh tpu setup  --name mae --zone us-central2-b
  ./launch.sh tpu run    --name mae --zone us-central2-b -- \
      --config configs/pretrain.py:poster --workdir gs://my-bucket/runs/poster \
      --config.dataset.data_dir=gs://my-bucket/data/s1
  ./launch.sh tpu tail   --name mae --zone us-central2-b
  ./launch.sh tpu stop   --name mae --zone us-central2-b    # checkpoint, then stop
  ./launch.sh tpu delete --name mae --zone us-central2-b

  # A v4-128 through a queued resource, waiting until it is ACTIVE:
  ./launch.sh tpu create --name mae --zone us-central2-b --type v4-128 --queued --spot --wait
  ./launch.sh tpu delete --name mae --zone us-central2-b --queued

  # SLURM: 2 nodes x 8 GPUs, 24 hours, the label-efficiency study:
  ./launch.sh slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \
      --module mae_jax.trainers.study -- --config configs/study.py:full --workdir /shared/mae/study

  # Two processes x 4 CPU devices on this machine, logs in workdirs/local2/logs:
  ./launch.sh local 2 --log-dir workdirs/local2/logs -- --config configs/pretrain.py:tiny \
      --workdir workdirs/local2 --config.dataset.data_dir=data/synthetic_tiny

  # What would a command do?
  ./launch.sh --dry-run tpu run --name mae --zone us-central2-b -- \
      --config configs/pretrain.py:poster --workdir gs://my-bucket/runs/poster
EOF
}

#######################################
# Running commands.
#######################################

# Prints a command shell-quoted, one line, so that it can be pasted into a shell.
print_cmd() {
  printf '%q' "$1"
  shift
  if (( $# )); then
    printf ' %q' "$@"
  fi
  printf '\n'
}

# The one place that runs commands: under --dry-run it prints them instead.
# Arguments:
#   --exec (optional): replace the current shell with the command, so that in a background
#     subshell `$!` is the command's own pid and signals sent to it reach the command.
#   The command and its arguments.
run_cmd() {
  local replace=0
  if [[ "${1-}" == "--exec" ]]; then
    replace=1
    shift
  fi
  if (( DRY_RUN )); then
    print_cmd "$@"
    return 0
  fi
  if (( replace )); then
    exec "$@"
  fi
  "$@"
}

# Writes CONTENT (plus a newline) to a new file PATH. Not a command, so not run_cmd: under
# --dry-run it prints a heredoc that writes the same file.
write_file() {
  local path="$1" content="$2"
  if (( DRY_RUN )); then
    printf "cat > %q <<'%s'\n%s\n%s\n" "${path}" "${HEREDOC_END}" "${content}" "${HEREDOC_END}"
    return 0
  fi
  # noclobber: never overwrite a script another launch.sh has just written.
  (set -o noclobber; printf '%s\n' "${content}" > "${path}")
}

#######################################
# Argument parsing.
#######################################

# Splits the command line at the first `--` into ARGS and PY_ARGS, and takes the global
# options (--dry-run, -h/--help) out of ARGS.
split_command_line() {
  local arg
  while (( $# )); do
    arg="$1"
    shift
    case "${arg}" in
      --)
        HAVE_PY_ARGS=1
        PY_ARGS=("$@")
        return 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      -h|--help)
        usage_full
        exit 0
        ;;
      *) ARGS+=("${arg}") ;;
    esac
  done
}

# Parses the options of SUBCOMMAND into OPT and its other words into POSITIONAL.
# Arguments:
#   Space-separated names of the options that take a value, e.g. "--name --zone".
#   Space-separated names of the flags, e.g. "--spot --queued".
#   The words to parse.
parse_options() {
  # Newlines become spaces, so that long lists can be wrapped.
  local valued=" ${1//$'\n'/ } " flags=" ${2//$'\n'/ } "
  shift 2
  local arg name value inline
  while (( $# )); do
    arg="$1"
    shift
    case "${arg}" in
      --*=*) name="${arg%%=*}"; value="${arg#*=}"; inline=1 ;;
      -*) name="${arg}"; value=""; inline=0 ;;
      *) POSITIONAL+=("${arg}"); continue ;;
    esac
    if [[ "${valued}" == *" ${name} "* ]]; then
      if (( ! inline )); then
        if (( $# == 0 )) || [[ "$1" == --* ]]; then
          die_usage "option ${name} needs a value"
        fi
        value="$1"
        shift
      fi
      [[ -n "${value}" ]] || die_usage "option ${name} needs a value"
      # Values end up in scripts and remote commands, where a newline would start a new line.
      [[ "${value}" != *[[:cntrl:]]* ]] || die_usage "option ${name} must not contain" \
        "control characters (a newline, a tab...), got $(printf '%q' "${value}")"
      OPT["${name}"]="${value}"
    elif [[ "${flags}" == *" ${name} "* ]]; then
      (( ! inline )) || die_usage "option ${name} takes no value"
      OPT["${name}"]=1
    else
      die_usage "unknown option '${name}' for '${SUBCOMMAND}'"
    fi
  done
}

# Exits 2 naming the first of the given options that was not given.
require_options() {
  local name
  for name in "$@"; do
    [[ -n "${OPT[${name}]-}" ]] || die_usage "'${SUBCOMMAND}' needs ${name}"
  done
}

# Exits 2 if there are positional words, which SUBCOMMAND does not take.
no_positional() {
  (( ${#POSITIONAL[@]} == 0 )) ||
    die_usage "unexpected argument '${POSITIONAL[0]}' for '${SUBCOMMAND}'"
}

# Exits 2 if there are positional words or entrypoint arguments that SUBCOMMAND does not take.
no_extra_words() {
  no_positional
  (( ! HAVE_PY_ARGS )) || die_usage "'${SUBCOMMAND}' takes no arguments after --"
}

# Exits 2 unless VALUE (named NAME in the message) matches the extended regex PATTERN.
check_value() {
  local name="$1" value="$2" pattern="$3" what="$4"
  [[ "${value}" =~ ${pattern} ]] || die_usage "${name} must be ${what}, not '${value}'"
}

# The --module option, checked to be a Python module name.
module_option() {
  local module="${OPT[--module]:-${DEFAULT_MODULE}}"
  check_value --module "${module}" '^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$' \
    "a Python module name"
  printf '%s' "${module}"
}

# Prints the value of the last --workdir in the arguments (absl keeps the last), or nothing.
workdir_of() {
  local workdir="" expect=0 arg
  for arg in "$@"; do
    if (( expect )); then
      workdir="${arg}"
      expect=0
      continue
    fi
    case "${arg}" in
      --workdir|-workdir) expect=1 ;;
      --workdir=*|-workdir=*) workdir="${arg#*=}" ;;
    esac
  done
  printf '%s' "${workdir}"
}

#######################################
# Cloud TPU VMs.
#######################################

# What every tpu command ends with: nothing, or --project=P.
TPU_PROJECT=()

# Checks the options all tpu actions need, and sets TPU_PROJECT.
tpu_common() {
  require_options --name --zone
  if [[ -n "${OPT[--project]-}" ]]; then
    TPU_PROJECT=("--project=${OPT[--project]}")
  fi
}

# Quotes a path for the remote shell, leaving a leading ~/ bare so that it expands there.
remote_path() {
  if [[ "$1" == "~/"* ]]; then
    printf '~/%q' "${1#\~/}"
  else
    printf '%q' "$1"
  fi
}

# One ssh command on the given workers of the TPU: tpu_ssh WORKERS REMOTE_COMMAND.
tpu_ssh() {
  run_cmd gcloud compute tpus tpu-vm ssh "${OPT[--name]}" "--zone=${OPT[--zone]}" \
    "--worker=$1" "--command=$2" "${TPU_PROJECT[@]}"
}

tpu_create() {
  parse_options "--name --zone --project --type --version" "--spot --queued --wait" "$@"
  no_extra_words
  tpu_common
  require_options --type
  local name="${OPT[--name]}" version="${OPT[--version]:-${DEFAULT_TPU_VERSION}}"
  local spot=()
  [[ -z "${OPT[--spot]-}" ]] || spot=(--spot)
  if [[ -z "${OPT[--queued]-}" ]]; then
    # tpu-vm create itself waits until the VM is READY, so --wait would have nothing to do.
    [[ -z "${OPT[--wait]-}" ]] ||
      die_usage "--wait goes with --queued (tpu-vm create already waits)"
    run_cmd gcloud compute tpus tpu-vm create "${name}" "--zone=${OPT[--zone]}" \
      "--accelerator-type=${OPT[--type]}" "--version=${version}" "${spot[@]}" \
      "${TPU_PROJECT[@]}"
    return
  fi
  run_cmd gcloud compute tpus queued-resources create "${name}" "--node-id=${name}" \
    "--zone=${OPT[--zone]}" "--accelerator-type=${OPT[--type]}" \
    "--runtime-version=${version}" "${spot[@]}" "${TPU_PROJECT[@]}"
  if [[ -n "${OPT[--wait]-}" ]]; then
    tpu_wait_active
  elif (( ! DRY_RUN )); then
    err "queued resource ${name} requested; it is usable once ACTIVE:"
    err "  gcloud compute tpus queued-resources describe ${name} --zone=${OPT[--zone]}"
  fi
}

# Polls the queued resource's state until it is ACTIVE; exits 1 if it failed.
tpu_wait_active() {
  local name="${OPT[--name]}" interval="${LAUNCH_POLL_SECONDS:-30}" state
  local describe=(gcloud compute tpus queued-resources describe "${name}"
                  "--zone=${OPT[--zone]}" "--format=value(state.state)" "${TPU_PROJECT[@]}")
  if (( DRY_RUN )); then
    run_cmd "${describe[@]}"
    return 0
  fi
  while true; do
    state="$(run_cmd "${describe[@]}")"
    case "${state}" in
      ACTIVE)
        err "queued resource ${name} is ACTIVE"
        return 0
        ;;
      FAILED|SUSPENDING|SUSPENDED)
        die "queued resource ${name} is ${state}; \`gcloud compute tpus queued-resources" \
          "describe ${name} --zone=${OPT[--zone]}\` says why"
        ;;
    esac
    err "queued resource ${name} is ${state:-in an unknown state}; checking again in ${interval} s"
    sleep "${interval}"
  done
}

# The version jax is pinned to in requirements.txt.
pinned_jax_version() {
  sed -n 's/^jax==\([^[:space:]]*\).*$/\1/p' "${REPO_DIR}/requirements.txt"
}

tpu_setup() {
  parse_options "--name --zone --project --jax-version --python" "" "$@"
  no_extra_words
  tpu_common
  local pinned jax_version py
  pinned="$(pinned_jax_version)"
  jax_version="${OPT[--jax-version]:-${pinned}}"
  [[ -n "${jax_version}" ]] || die_usage "no jax pin in requirements.txt; pass --jax-version"
  check_value --jax-version "${jax_version}" '^[0-9][0-9A-Za-z.+!-]*$' "a version number"
  py="$(printf '%q' "${OPT[--python]:-python3}")"

  local tarball tmp_dir
  if (( DRY_RUN )); then
    tarball="${TMPDIR:-/tmp}/mae_jax.tar.gz"
  else
    tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_setup.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: tmp_dir is local.
    trap "rm -rf '${tmp_dir}'" EXIT
    tarball="${tmp_dir}/mae_jax.tar.gz"
  fi
  # The files git lists, minus ones deleted in the working tree (tar would fail on them).
  # Untracked files that are not ignored come along, so that a new module does not go missing
  # on the workers just because it has not been `git add`ed yet.
  run_cmd bash -c 'set -euo pipefail
git -C "$1" ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d "" f; do
    if [[ -f "$1/$f" || -L "$1/$f" ]]; then printf "%s\0" "$f"; fi
  done |
  tar -C "$1" -czf "$2" --null -T -' pack "${REPO_DIR}" "${tarball}"
  run_cmd gcloud compute tpus tpu-vm scp "${tarball}" "${OPT[--name]}:~/mae_jax.tar.gz" \
    "--zone=${OPT[--zone]}" --worker=all "${TPU_PROJECT[@]}"

  # requirements-lock.txt pins jax and jaxlib to the same version as requirements.txt. As a
  # constraints file (-c) it only limits versions, so with jax[tpu]==<that version> pip adds
  # the extra's libtpu and requests (requests is locked too, libtpu is not) from PyPI or the
  # libtpu page and everything else resolves as on CPU. Another jax version would contradict
  # both pins, so for it the jax and jaxlib lines are dropped from copies of the two files.
  local requirements="requirements.txt" lock="requirements-lock.txt" filter=""
  if [[ "${jax_version}" != "${pinned}" ]]; then
    requirements="requirements-tpu.txt"
    lock="requirements-lock-tpu.txt"
    filter="sed -E '/^(jax|jaxlib)==/d' requirements.txt > ${requirements} && "
    filter+="sed -E '/^(jax|jaxlib)==/d' requirements-lock.txt > ${lock} && "
  fi
  # Stops early with a clear message, instead of pip's "no matching distribution for jax".
  local version_check="'import sys; sys.exit(\"mae_jax needs Python >= 3.11 (JAX 0.10), this is"
  version_check+=" \" + sys.version.split()[0] + \"; install a newer one and pass --python\")"
  version_check+=" if sys.version_info < (3, 11) else None'"
  local remote="mkdir -p ~/mae_jax && tar -xzf ~/mae_jax.tar.gz -C ~/mae_jax"
  remote+=" && rm -f ~/mae_jax.tar.gz && cd ~/mae_jax && ${py} -c ${version_check} && ${filter}"
  remote+="${py} -m pip install -r ${requirements} -c ${lock} 'jax[tpu]==${jax_version}'"
  remote+=" -f ${LIBTPU_URL} && ${py} -m pip install --no-deps -e ."
  tpu_ssh all "${remote}"
}

tpu_run() {
  parse_options "--name --zone --project --module --log --python" "" "$@"
  no_positional
  tpu_common
  local module workdir
  module="$(module_option)"
  workdir="$(workdir_of "${PY_ARGS[@]}")"
  if [[ "${workdir}" != gs://?* ]]; then
    die_usage "multi-host TPU runs need a gs:// workdir that every worker can see" \
      "(pass --workdir gs://BUCKET/PATH after --; got '${workdir:-none}')"
  fi
  local log py args=""
  log="$(remote_path "${OPT[--log]:-${DEFAULT_LOG}}")"
  py="$(printf '%q' "${OPT[--python]:-python3}")"
  if (( ${#PY_ARGS[@]} )); then
    args="$(printf ' %q' "${PY_ARGS[@]}")"
  fi
  # A second run on the same TPU could not open the chips; say so instead.
  local remote="cd ~/mae_jax || exit 1; if pgrep -f '${ENTRYPOINT_PATTERN}' > /dev/null; then"
  remote+=" echo \"\$(hostname): mae_jax is already running; stop it first\""
  remote+=" \"(launch.sh tpu stop)\" >&2;"
  remote+=" exit 1; fi; nohup ${py} -m ${module}${args} > ${log} 2>&1 < /dev/null &"
  remote+=" echo \"\$(hostname): started pid \$!, log:\" ${log}"
  tpu_ssh all "${remote}"
}

tpu_tail() {
  parse_options "--name --zone --project --worker --log" "" "$@"
  no_extra_words
  tpu_common
  local worker="${OPT[--worker]:-0}"
  check_value --worker "${worker}" '^[0-9]+$' "a worker number"
  tpu_ssh "${worker}" "tail -n 100 -F $(remote_path "${OPT[--log]:-${DEFAULT_LOG}}")"
}

tpu_stop() {
  parse_options "--name --zone --project" "" "$@"
  no_extra_words
  tpu_common
  # pkill exits 1 when nothing matched: not an error here (that worker has nothing to stop).
  local remote="pkill -TERM -f '${ENTRYPOINT_PATTERN}'; rc=\$?; if [ \$rc -eq 0 ]; then"
  remote+=" echo \"\$(hostname): sent SIGTERM; mae_jax saves a checkpoint at the next step\""
  remote+=" \"and exits\";"
  remote+=" elif [ \$rc -eq 1 ]; then echo \"\$(hostname): no mae_jax process running\";"
  remote+=" else exit \$rc; fi"
  tpu_ssh all "${remote}"
}

tpu_delete() {
  parse_options "--name --zone --project" "--queued" "$@"
  no_extra_words
  tpu_common
  if [[ -n "${OPT[--queued]-}" ]]; then
    run_cmd gcloud compute tpus queued-resources delete "${OPT[--name]}" \
      "--zone=${OPT[--zone]}" --force --quiet "${TPU_PROJECT[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm delete "${OPT[--name]}" "--zone=${OPT[--zone]}" --quiet \
      "${TPU_PROJECT[@]}"
  fi
}

tpu_main() {
  (( $# )) || die_usage "'tpu' needs an action: create, setup, run, tail, stop or delete"
  local action="$1"
  shift
  SUBCOMMAND="tpu ${action}"
  case "${action}" in
    create) tpu_create "$@" ;;
    setup) tpu_setup "$@" ;;
    run) tpu_run "$@" ;;
    tail) tpu_tail "$@" ;;
    stop) tpu_stop "$@" ;;
    delete) tpu_delete "$@" ;;
    *) die_usage "unknown tpu action '${action}' (create, setup, run, tail, stop, delete)" ;;
  esac
}

#######################################
# SLURM.
#######################################

# Exits 2 if the value of option NAME (e.g. --partition) holds a character that sbatch does
# not read literally in an #SBATCH line: whitespace ends the value, '#' starts a comment,
# quotes and '\' are taken as quoting.
check_sbatch_word() {
  local name="$1" value="$2"
  [[ "${value}" != *[[:space:]\"\'\\#]* ]] ||
    die_usage "${name} must not contain whitespace, quotes, '\\' or '#' (it goes into an" \
      "#SBATCH line), got '${value}'"
}

# Prints VALUE as one word of an #SBATCH line: as it is when sbatch reads it literally, else
# in double quotes with '"' and '\' escaped (sbatch's own quoting, not the shell's). VALUE has
# no control characters (parse_options and slurm_main refuse them).
sbatch_word() {
  local value="$1"
  if [[ "${value}" =~ ^[A-Za-z0-9_./:@%+=,-]+$ ]]; then
    printf '%s' "${value}"
  else
    value="${value//\\/\\\\}"
    printf '"%s"' "${value//\"/\\\"}"
  fi
}

# Prints the sbatch script. Arguments: the script's path, the job's output directory.
slurm_script() {
  local path="$1" out_dir="$2"
  local job="${OPT[--job-name]:-mae_jax}" gpus="${OPT[--gpus-per-node]}"
  local tasks="${gpus##*:}" module python command checkout
  module="$(module_option)"
  checkout="$(printf '%q' "${REPO_DIR}")"  # On one line, whatever the path holds.
  python="${PYTHON:-python}"
  command="srun --kill-on-bad-exit=1 $(printf '%q' "${python}") -m ${module}"
  if (( ${#PY_ARGS[@]} )); then
    command+="$(printf ' %q' "${PY_ARGS[@]}")"
  fi
  cat <<EOF
#!/bin/bash
# mae_jax job written by launch.sh on $(date '+%Y-%m-%d %H:%M:%S') (checkout: ${checkout}).
# Submit it (again) with: sbatch $(printf '%q' "${path}")
#SBATCH --job-name=${job}
#SBATCH --nodes=${OPT[--nodes]}
#SBATCH --ntasks-per-node=${tasks}
#SBATCH --gpus-per-node=${gpus}
#SBATCH --cpus-per-task=${OPT[--cpus-per-task]:-8}
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$(sbatch_word "${out_dir//%/%%}/%x-%j.out")
#SBATCH --chdir=$(sbatch_word "${PWD}")
EOF
  local option
  for option in partition time account; do
    if [[ -n "${OPT[--${option}]-}" ]]; then
      printf '#SBATCH --%s=%s\n' "${option}" "${OPT[--${option}]}"
    fi
  done
  cat <<EOF

# No \`set -e\`: the statuses of \`wait\` below are expected to be non-zero at times.
set -u
echo "\$(date '+%F %T') job \${SLURM_JOB_ID:-?} (restart \${SLURM_RESTART_COUNT:-0})" \\
  "on \${SLURM_JOB_NODELIST:-?}"

# --signal=B:TERM@120 signals only this shell, 120 s before the time limit; pass it on to the
# job step, whose srun relays it to every task: mae_jax saves a checkpoint at the next step and
# exits 0. Only the first one is passed on, because mae_jax takes a second SIGTERM as "stop
# now, without saving" (scancel and preemption signal the tasks directly as well).
srun_pid=""
forwarded=0
forward_term() {
  if (( forwarded )) || [[ -z "\${srun_pid}" ]]; then
    return
  fi
  forwarded=1
  echo "\$(date '+%F %T') SIGTERM: passing it on to srun (pid \${srun_pid})" >&2
  kill -TERM "\${srun_pid}" 2>/dev/null
}
trap forward_term TERM

# One task per GPU. JAX's SLURM detection (jax.distributed.initialize() without arguments)
# takes the coordinator (first node of the step), the process count and id, and the task's
# GPU (SLURM_LOCALID) from the SLURM_* variables srun sets, so no other environment is needed.
# srun runs in the background so that this shell can take signals while it waits.
${command} &
srun_pid=\$!

# wait also returns (with a status above 128) whenever the trap has run; keep waiting until
# srun itself has exited, and leave with its status.
while true; do
  wait "\${srun_pid}"
  status=\$?
  if ! kill -0 "\${srun_pid}" 2>/dev/null; then
    break
  fi
done
echo "\$(date '+%F %T') srun exited with status \${status}"
exit "\${status}"
EOF
}

slurm_main() {
  SUBCOMMAND="slurm"
  parse_options "--nodes --gpus-per-node --partition --time --account --job-name --module
                 --script-dir --cpus-per-task" "" "$@"
  no_positional
  require_options --nodes --gpus-per-node
  check_value --nodes "${OPT[--nodes]}" '^[1-9][0-9]*$' "a positive integer"
  check_value --gpus-per-node "${OPT[--gpus-per-node]}" '^([A-Za-z0-9_.-]+:)?[1-9][0-9]*$' \
    "a positive integer, or TYPE:COUNT"
  check_value --cpus-per-task "${OPT[--cpus-per-task]:-8}" '^[1-9][0-9]*$' "a positive integer"
  local job="${OPT[--job-name]:-mae_jax}"
  # The job name is part of the script's file name.
  check_value --job-name "${job}" '^[A-Za-z0-9_.-]+$' "letters, digits, '_', '.' or '-'"
  module_option > /dev/null
  # Values written into #SBATCH lines (parse_options has refused control characters).
  [[ -z "${OPT[--partition]-}" ]] || check_sbatch_word --partition "${OPT[--partition]}"
  [[ -z "${OPT[--account]-}" ]] || check_sbatch_word --account "${OPT[--account]}"
  [[ -z "${OPT[--time]-}" ]] || check_value --time "${OPT[--time]}" \
    '^(([0-9]+-)?[0-9]+(:[0-9]+){0,2}|UNLIMITED|unlimited|INFINITE|infinite)$' \
    "a SLURM time limit (MINUTES, HH:MM:SS, DAYS-HH, DAYS-HH:MM:SS...)"
  [[ "${PWD}" != *[[:cntrl:]]* ]] ||
    die "the current directory $(printf '%q' "${PWD}") holds a control character (a newline," \
      "a tab...), which cannot go into the job's #SBATCH --chdir line; submit from another one"

  local dir="${OPT[--script-dir]:-./slurm}"
  [[ "${dir}" == /* ]] || dir="${PWD}/${dir#./}"
  # A '\' in the output path would turn off the job name and id in its %x-%j pattern.
  [[ "${dir}" != *\\* ]] ||
    die_usage "--script-dir: the job output folder must not contain '\\', got '${dir}'"
  local stamp path count=1
  stamp="$(date +%Y%m%d-%H%M%S)"
  path="${dir}/${job}-${stamp}.sbatch"
  # Several submissions within one second (a sweep) get -1, -2, ... suffixes.
  while [[ -e "${path}" ]]; do
    path="${dir}/${job}-${stamp}-${count}.sbatch"
    count=$((count + 1))
  done
  local script
  script="$(slurm_script "${path}" "${dir}")"
  run_cmd mkdir -p "${dir}"
  write_file "${path}" "${script}"
  run_cmd sbatch "${path}"
  if (( ! DRY_RUN )); then
    err "script: ${path}; job output: ${dir}/${job}-JOBID.out"
  fi
}

#######################################
# Local multi-process job.
#######################################

declare -A RUNNING=()   # pid -> process index, for the processes still running.
SIGNALS_RECEIVED=0
STDERR_FD=2             # A copy of launch.sh's stderr, for the signal trap (see local_supervise).

# The interpreter for `local`: $PYTHON, else the checkout's virtualenv, else python3.
local_python() {
  if [[ -n "${PYTHON-}" ]]; then
    printf '%s' "${PYTHON}"
  elif [[ -x "${REPO_DIR}/.venv/bin/python" ]]; then
    printf '%s' "${REPO_DIR}/.venv/bin/python"
  else
    printf 'python3'
  fi
}

# Asks the OS for a free TCP port. A read-only query, so it runs under --dry-run too: the
# printed commands then work as they are.
free_port() {
  "$1" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])'
}

# XLA_FLAGS with D host devices: the caller's flags, less any device count, plus ours.
xla_flags_with_devices() {
  local flags=() kept=() flag
  read -r -a flags <<< "${XLA_FLAGS:-}"
  for flag in "${flags[@]}"; do
    [[ "${flag}" == --xla_force_host_platform_device_count=* ]] || kept+=("${flag}")
  done
  kept+=("--xla_force_host_platform_device_count=$1")
  printf '%s' "${kept[*]}"
}

# Starts process I of the job in the background and records its pid in RUNNING.
# Arguments: I, LOG_DIR (may be empty), then the command (env ... python -m ...).
local_start() {
  local index="$1" log_dir="$2"
  shift 2
  local log=/dev/null
  [[ -z "${log_dir}" ]] || log="${log_dir}/process_${index}.log"
  # The prefixing sed (and tee) run inside the background job, so they are in its process
  # group: Ctrl-C cannot kill them and cut the process's output. `run_cmd --exec` makes the
  # job's pid the python process itself, so that `wait` reports python's status (not
  # sed's) and signals go straight to it.
  # Every process's output passes through its own `sed -u`, which writes whole lines at once:
  # Python writes a line's text and its newline separately, so without it lines of different
  # processes can interleave mid-line on the terminal. One pipe for both streams, for the same
  # reason within a process.
  if (( index == 0 )); then
    run_cmd --exec "$@" < /dev/null > >(tee "${log}" | sed -u '') 2>&1 &
  else
    run_cmd --exec "$@" < /dev/null > >(tee "${log}" | sed -u "s/^/[process ${index}] /") 2>&1 &
  fi
  RUNNING[$!]="${index}"
}

# Describes an exit status: "exit code 3", or "exit code 137 (SIGKILL)".
describe_status() {
  local text="exit code $1"
  if (( $1 > 128 )); then
    text+=" (SIG$(kill -l "$(( $1 - 128 ))" 2>/dev/null || echo "?"))"
  fi
  printf '%s' "${text}"
}

# Trap for SIGTERM / SIGINT / SIGHUP: each one sends SIGTERM to the running processes.
local_on_signal() {
  SIGNALS_RECEIVED=$((SIGNALS_RECEIVED + 1))
  if (( SIGNALS_RECEIVED == 1 )); then
    err "got SIG$1: sending SIGTERM to the processes (they save a checkpoint and stop);" \
      "Ctrl-C again to stop them at once"
  else
    err "got SIG$1 again: sending another SIGTERM (mae_jax stops at once)"
  fi
  local pid
  for pid in "${!RUNNING[@]}"; do
    kill -TERM "${pid}" 2>/dev/null || true
  done
} 2>&"${STDERR_FD}"

# Kills whatever still runs (on launch.sh's own exit, e.g. after an error).
local_kill_all() {
  local pid
  for pid in "${!RUNNING[@]}"; do
    kill -KILL "${pid}" 2>/dev/null || true
  done
}

# Waits for all processes; on the first failure kills the rest. Returns the first failure's
# status, or 0.
local_supervise() {
  local first_status=0 pid status index
  while (( ${#RUNNING[@]} )); do
    pid=""
    status=0
    # Without stderr, because bash reports jobs killed by a signal there ("Killed" and the
    # whole command) and we report them ourselves. The trap runs inside this wait, hence its
    # own copy of stderr.
    { wait -n -p pid "${!RUNNING[@]}"; } 2>/dev/null || status=$?
    if [[ -z "${pid-}" ]]; then
      # A trapped signal interrupted wait (its trap has run); wait again.
      (( status != 127 )) || { err "error: lost track of the processes"; return 1; }
      continue
    fi
    index="${RUNNING[${pid}]}"
    unset "RUNNING[${pid}]"
    if (( status != 0 && first_status == 0 )); then
      first_status="${status}"
      err "process ${index} failed with $(describe_status "${status}")"
      if (( ${#RUNNING[@]} )); then
        err "killing the other processes (they would wait for it forever)"
        local_kill_all
      fi
    fi
  done
  return "${first_status}"
}

local_main() {
  SUBCOMMAND="local"
  parse_options "--devices-per-process --port --module --log-dir" "" "$@"
  (( ${#POSITIONAL[@]} >= 1 )) || die_usage "'local' needs the number of processes, e.g. 'local 2'"
  (( ${#POSITIONAL[@]} == 1 )) || die_usage "unexpected argument '${POSITIONAL[1]}' for 'local'"
  local count="${POSITIONAL[0]}" devices="${OPT[--devices-per-process]:-4}" module python port
  check_value "the number of processes" "${count}" '^[1-9][0-9]*$' "a positive integer"
  check_value --devices-per-process "${devices}" '^[1-9][0-9]*$' "a positive integer"
  module="$(module_option)"
  python="$(local_python)"
  command -v "${python}" > /dev/null || die "no Python interpreter '${python}' (set PYTHON)"
  if [[ -n "${OPT[--port]-}" ]]; then
    port="${OPT[--port]}"
    check_value --port "${port}" '^[1-9][0-9]{0,4}$' "a port number"
    (( port <= 65535 )) || die_usage "--port must be a port number, not '${port}'"
  else
    port="$(free_port "${python}")"
  fi
  local xla_flags log_dir="${OPT[--log-dir]-}" index
  xla_flags="$(xla_flags_with_devices "${devices}")"
  if (( ! DRY_RUN )); then
    (( BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1) )) ||
      die "'local' needs bash >= 5.1 (wait -n -p); this is bash ${BASH_VERSION}"
    [[ -z "${log_dir}" ]] || run_cmd mkdir -p "${log_dir}"
    # Job control puts every process in its own process group, so that Ctrl-C at the
    # terminal reaches only launch.sh, which then sends each process one SIGTERM.
    set -m
    exec {STDERR_FD}>&2
    trap 'local_on_signal TERM' TERM
    trap 'local_on_signal INT' INT
    trap 'local_on_signal HUP' HUP
    trap local_kill_all EXIT
  fi
  for (( index = 0; index < count; index++ )); do
    # A signal while starting: do not start more processes (the trap stopped the others).
    (( SIGNALS_RECEIVED == 0 )) || break
    local command=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags}"
                   "JAX_COORDINATOR_ADDRESS=localhost:${port}" "JAX_NUM_PROCESSES=${count}"
                   "JAX_PROCESS_ID=${index}" PYTHONUNBUFFERED=1
                   "${python}" -m "${module}" "${PY_ARGS[@]}")
    if (( DRY_RUN )); then
      run_cmd "${command[@]}"
    else
      local_start "${index}" "${log_dir}" "${command[@]}"
    fi
  done
  (( ! DRY_RUN )) || return 0
  err "started ${count} processes (coordinator localhost:${port}, ${devices} CPU devices each)"
  local status=0
  local_supervise || status=$?
  if (( status == 0 )); then
    err "all ${count} processes exited 0"
  fi
  return "${status}"
}

#######################################
# Entry point.
#######################################

main() {
  if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
    echo "${PROG}: needs bash >= 4.4; this is bash ${BASH_VERSION}" >&2
    exit 2
  fi
  split_command_line "$@"
  (( ${#ARGS[@]} )) || die_usage "missing subcommand (tpu, slurm, local or help)"
  local command="${ARGS[0]}"
  case "${command}" in
    help)
      usage_full
      ;;
    tpu) tpu_main "${ARGS[@]:1}" ;;
    slurm) slurm_main "${ARGS[@]:1}" ;;
    local) local_main "${ARGS[@]:1}" ;;
    *) die_usage "unknown subcommand '${command}' (tpu, slurm, local or help)" ;;
  esac
}

main "$@"
