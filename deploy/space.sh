#!/bin/sh
# A Hugging Face Space's repository, made from this checkout's last commit: the files the image
# needs, and README.md with the Space's front matter on top (sdk: docker, app_port: the image's PORT).
#   sh deploy/space.sh DIR
set -eu
out=${1:?usage: sh deploy/space.sh DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
git -C "$root" archive --format=tar HEAD Dockerfile .dockerignore pyproject.toml README.md constraints.txt \
  deploy engine server languages csrc | tar -x -C "$out"
{
  printf -- '---\ntitle: kodkod\nemoji: 🦊\ncolorFrom: gray\ncolorTo: blue\nsdk: docker\napp_port: 8080\n---\n\n'
  cat "$out/README.md"
} > "$out/README.md.new"
mv "$out/README.md.new" "$out/README.md"
echo "$out: a Space repository ($(find "$out" -type f | wc -l) files); push it to the Space's git (README: Hugging Face Spaces)"
