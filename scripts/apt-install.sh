#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet (apt, no
# recommends, no prompts); their own services are not wanted: the worker starts its own.
#   scripts/apt-install.sh LABEL PACKAGE...      (LABEL prefixes the progress line)
set -euo pipefail
label=$1
shift
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
(( ${#missing[@]} )) || exit 0
echo "$label: installing ${missing[*]}"
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
