#!/usr/bin/env bash
# The Fig. 9 test video: SECONDS of 720p25 H.264 at a constant 1.2 Mbit/s (ffmpeg's testsrc2, x264
# ultrafast, moov first so it plays while it downloads), made once and kept under target/fig9/ (never
# committed). Prints its path.
#
#   fig9_video.sh SECONDS
set -euo pipefail
seconds=${1:?usage: fig9_video.sh SECONDS}
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fig9_video.sh: SECONDS, not $seconds" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
out="$target/fig9/video-${seconds}s.mp4"
if [ ! -s "$out" ]; then
  mkdir -p "$(dirname "$out")"
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i "testsrc2=size=1280x720:rate=25,format=yuv420p" \
    -t "$seconds" -c:v libx264 -preset ultrafast -b:v 1200k -maxrate 1200k -bufsize 600k -g 50 \
    -movflags +faststart -an "$out.tmp.mp4"
  mv "$out.tmp.mp4" "$out"
fi
echo "$out"
