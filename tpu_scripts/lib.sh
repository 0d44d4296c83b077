# Helpers shared by the launch scripts in tpu_scripts/; sourced, never run.
#
#   hm_quote WORD      WORD quoted for bash, as a reader would write it: bare when it holds only
#                      safe characters, else in single quotes, else (it holds a ') in double quotes.
#   hm_join WORD...    the words quoted and joined by spaces: one command line.
#   hm_run CMD...      under HM_DRY_RUN=1 prints the command line on stdout and runs nothing;
#                      otherwise prints it on stderr after '+ ' (like `set -x`) and runs it.
#   hm_exec CMD...     the same, but replaces the shell (signals then reach CMD itself).
#   hm_die MSG [RC]    "PROG: error: MSG" on stderr, exit RC (2, a usage error, by default).
#   hm_usage FILE      the comment block at the top of FILE (each script's --help).
# shellcheck shell=bash

HM_DRY_RUN=0
HM_PROG=${HM_PROG:-${0##*/}}

# Characters that never need quoting; the same set as Python's shlex.quote.
HM_SAFE_RE='^[A-Za-z0-9_@%+=:,./-]+$'

hm_quote() {
  local s=$1
  if [[ $s =~ $HM_SAFE_RE ]]; then
    printf '%s' "$s"
  elif [[ $s != *"'"* ]]; then
    printf "'%s'" "$s"
  elif [[ $s != *'!'* ]]; then
    # Inside double quotes only \ " $ ` are special to bash; '!' (history expansion at an
    # interactive prompt) is kept out by the test above so a pasted line means what it says.
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//\$/\\\$}
    s=${s//\`/\\\`}
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

hm_join() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(hm_quote "$word")"
  done
  printf '%s' "$out"
}

hm_run() {
  if ((HM_DRY_RUN)); then
    printf '%s\n' "$(hm_join "$@")"
    return 0
  fi
  printf '+ %s\n' "$(hm_join "$@")" >&2
  "$@"
}

hm_exec() {
  if ((HM_DRY_RUN)); then
    printf '%s\n' "$(hm_join "$@")"
    exit 0
  fi
  printf '+ %s\n' "$(hm_join "$@")" >&2
  exec "$@"
}

hm_die() {
  printf '%s: error: %s\n' "$HM_PROG" "$1" >&2
  exit "${2:-2}"
}

hm_warn() {
  printf '%s: warning: %s\n' "$HM_PROG" "$1" >&2
}

hm_usage() {
  awk 'NR == 1 { next }
       /^# shellcheck/ { next }
       /^#/ { sub(/^# ?/, ""); print; next }
       { exit }' "$1"
}

# hm_is_uint VALUE: VALUE is a non-negative decimal integer.
hm_is_uint() {
  [[ $1 =~ ^[0-9]+$ ]]
}

# hm_check_remote_path NAME VALUE: VALUE is a plain path on a worker (relative to its home unless
# absolute) that is safe to `rm -rf`/`mv`: no '..', no empty components, no shell metacharacters.
hm_check_remote_path() {
  local re='^/?[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$'
  if [[ ! $2 =~ $re || /$2/ == */../* || /$2/ == */./* ]]; then
    hm_die "$1=$(hm_quote "$2") is not a plain path (letters, digits, '_', '.', '-', '/'; no '..')"
  fi
}
