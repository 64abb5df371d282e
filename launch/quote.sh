# Shell helpers the launch scripts source (bash).

# Shell-quote each argument when it needs it (like Python's shlex.quote), so that printed commands
# (--dry-run) can be pasted and remote command strings survive the workers' shell.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Run a command, or with DRY_RUN=1 print it (quoted) instead.
run() {
  if (( ${DRY_RUN:-0} )); then quote "$@"; else "$@"; fi
}
