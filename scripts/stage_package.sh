# Sourced by scripts/sanitize.sh and scripts/emulate_avx512.sh: stage_package SO TAG copies
# python/leankernels to a new temporary folder with SO as its _C (no other _C, no caches), sets
# STAGE to the folder (the package is $STAGE/pkg/leankernels; put $STAGE/pkg on PYTHONPATH) and
# removes it when the shell exits. Run from the checkout's root.
stage_package() {
  STAGE=$(mktemp -d "${TMPDIR:-/tmp}/lk-$2.XXXXXX")
  trap 'rm -rf "$STAGE"' EXIT
  mkdir -p "$STAGE/pkg"
  cp -r python/leankernels "$STAGE/pkg/"
  find "$STAGE/pkg" \( -name '_C*.so' -o -name '__pycache__' -o -name '.*.tmp' \) -prune -exec rm -rf {} +
  cp "$1" "$STAGE/pkg/leankernels/"
}
