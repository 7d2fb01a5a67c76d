#!/usr/bin/env bash
# Installs the captioned emoji sets offline-from-npm: scripts/fetch_emoji.sh [DEST] [twitter] [google]
#   DEST    where to unpack (default: $MASC_DATA/twemoji); the result is DEST/package/{emoji.json,img/<style>/64/*.png},
#           the layout masc_llamagen.data.images.Twemoji and masc_llamagen.data.captions.TwemojiCaptions read.
#   styles  twitter (default: emoji-datasource-twitter, art CC-BY-4.0) and/or google (emoji-datasource-google, Noto
#           Emoji art Apache-2.0). Credit them wherever the images are shown.
# Idempotent: a style already unpacked (its marker file exists) is skipped. Only emoji.json, the package metadata and
# the 64-px images are unpacked (not the sprite sheets). Any failure is one line on stderr and exit 1.
set -euo pipefail
VERSION=${EMOJI_DATASOURCE_VERSION:-16.0.0}
die() { echo "error: $*" >&2; exit 1; }

DEST=""
STYLES=()
for arg in "$@"; do
  case "$arg" in
    twitter|google) STYLES+=("$arg") ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $arg; usage: scripts/fetch_emoji.sh [DEST] [twitter] [google]" ;;
    *) [[ -z "$DEST" ]] || die "two destinations given ($DEST, $arg); usage: scripts/fetch_emoji.sh [DEST] [twitter] [google]"
       DEST=$arg ;;
  esac
done
[[ ${#STYLES[@]} -gt 0 ]] || STYLES=(twitter)
if [[ -z "$DEST" ]]; then
  [[ -n "${MASC_DATA:-}" ]] || die "no destination: pass DEST (scripts/fetch_emoji.sh /data/twemoji) or set MASC_DATA (the set goes to \$MASC_DATA/twemoji)"
  DEST="$MASC_DATA/twemoji"
fi

todo=()
for style in "${STYLES[@]}"; do
  [[ -f "$DEST/package/.fetched-$style-$VERSION" && -f "$DEST/package/emoji.json" ]] || todo+=("$style")
done
if [[ ${#todo[@]} -eq 0 ]]; then
  echo "emoji sets (${STYLES[*]}) already in $DEST/package"
  exit 0
fi
command -v npm >/dev/null 2>&1 || die "npm not found; install Node.js and npm (e.g. sudo apt-get install -y npm), then rerun scripts/fetch_emoji.sh"
command -v tar >/dev/null 2>&1 || die "tar not found; install it (sudo apt-get install -y tar), then rerun"
mkdir -p "$DEST" 2>/dev/null || die "cannot create $DEST; pick a writable DEST"
work=$(mktemp -d "$DEST/.fetch-emoji.XXXXXX" 2>/dev/null) || die "cannot write in $DEST; pick a writable DEST"
trap 'rm -rf "$work"' EXIT

for style in "${todo[@]}"; do
  pkg="emoji-datasource-$style@$VERSION"
  tgz="emoji-datasource-$style-$VERSION.tgz"
  (cd "$work" && npm pack --silent "$pkg" >"$work/npm.log" 2>&1) \
    || die "npm pack $pkg failed ($(grep -m1 -iE 'err|error' "$work/npm.log" || tail -n1 "$work/npm.log")); check the npm registry is reachable, or unpack $tgz into $DEST yourself"
  [[ -f "$work/$tgz" ]] || die "npm pack $pkg did not produce $tgz; unpack it into $DEST yourself"
  rm -rf "$work/package"
  tar -xzf "$work/$tgz" -C "$work" package/emoji.json package/package.json "package/img/$style/64" \
    || die "$tgz is not the expected package (no package/emoji.json or package/img/$style/64); delete ~/.npm/_cacache and rerun"
  n=$(find "$work/package/img/$style/64" -name '*.png' | wc -l)
  [[ "$n" -gt 0 ]] || die "$tgz holds no 64-px $style images; delete ~/.npm/_cacache and rerun"
  mkdir -p "$DEST/package/img"
  rm -rf "$DEST/package/img/$style.old"
  [[ -d "$DEST/package/img/$style" ]] && mv "$DEST/package/img/$style" "$DEST/package/img/$style.old"
  mv "$work/package/img/$style" "$DEST/package/img/$style"
  rm -rf "$DEST/package/img/$style.old"
  # emoji.json is the same file in every emoji-datasource-* package of one version
  mv -f "$work/package/emoji.json" "$DEST/package/emoji.json"
  mv -f "$work/package/package.json" "$DEST/package/package-$style.json"
  [[ -f "$DEST/package/package.json" ]] || cp "$DEST/package/package-$style.json" "$DEST/package/package.json"
  rm -f "$work/$tgz"
  touch "$DEST/package/.fetched-$style-$VERSION"
  echo "$pkg: $n images in $DEST/package/img/$style/64"
done
