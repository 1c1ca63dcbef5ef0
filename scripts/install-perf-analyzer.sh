#!/usr/bin/env bash
# Installs Triton's perf_analyzer into the project-local .deps/ and writes the
# launcher .deps/bin/perf_analyzer.
#
# perf_analyzer ships on PyPI as the wheel perf-analyzer==2.60.0, tagged
# manylinux_2_38: its binary needs glibc >= 2.38 and GLIBCXX_3.4.32, newer than
# Debian 12's glibc 2.36 / gcc 12. So this script
#   1. downloads the wheel for that platform tag with pip (hash-pinned) and
#      unpacks it into .deps/perf-analyzer/;
#   2. downloads libc6, libstdc++6 and libgcc-s1 from Debian 13 (trixie) with
#      apt-get download, using a project-local apt configuration under
#      .deps/apt-trixie/ (its own sources list, lists and cache; the system's
#      sources and lists are neither read for this nor changed), and extracts
#      them with dpkg-deb -x into .deps/glibc-new/ -- nothing is installed
#      system-wide and the system glibc is untouched;
#   3. writes .deps/bin/perf_analyzer, which runs the binary through the new
#      dynamic loader: ld-linux-x86-64.so.2 --library-path <new libs> ...
#      (libssl, libcrypto and libz still come from the system).
#
# Idempotent: does nothing when the launcher works already. Re-install with
# FORCE=1. Prints the launcher path on success; exits non-zero with a message
# saying what failed otherwise.
set -euo pipefail

PA_VERSION="2.60.0"
PA_PLATFORM="manylinux_2_38_x86_64"
PA_WHEEL="perf_analyzer-${PA_VERSION}-py3-none-${PA_PLATFORM}.whl"
PA_SHA256="23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25"
DEBIAN_SUITE="trixie"
DEBIAN_PACKAGES=(libc6 libstdc++6 libgcc-s1)
STAMP_VERSION="v1-${PA_VERSION}-${DEBIAN_SUITE}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
pa_dir="$deps/perf-analyzer"
glibc_dir="$deps/glibc-new"
apt_dir="$deps/apt-trixie"
bin_dir="$deps/bin"
launcher="$bin_dir/perf_analyzer"
stamp="$deps/.perf-analyzer-$STAMP_VERSION"

die() {
  echo "install-perf-analyzer: ERROR: $*" >&2
  exit 1
}
note() { echo "install-perf-analyzer: $*" >&2; }

if [ "$(uname -m)" != "x86_64" ]; then
  die "only x86_64 is supported (perf-analyzer wheels are x86_64 here), got $(uname -m)"
fi

launcher_works() {
  [ -x "$launcher" ] && "$launcher" --version 2>&1 | grep -q "Perf Analyzer Version"
}

if [ "${FORCE:-0}" != "1" ] && [ -f "$stamp" ] && launcher_works; then
  echo "$launcher"
  exit 0
fi

for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not found"
done

# ---------------------------------------------------------------- 1. wheel
pip_cmd=()
if [ -x "$deps/venv/bin/pip" ]; then
  pip_cmd=("$deps/venv/bin/pip")
elif [ -x "$root/scripts/setup-deps.sh" ] || [ -f "$root/scripts/setup-deps.sh" ]; then
  note "no .deps/venv yet; running scripts/setup-deps.sh"
  bash "$root/scripts/setup-deps.sh" || die "scripts/setup-deps.sh failed"
  pip_cmd=("$deps/venv/bin/pip")
elif python3 -m pip --version >/dev/null 2>&1; then
  pip_cmd=(python3 -m pip)
else
  die "no pip found (.deps/venv/bin/pip or python3 -m pip)"
fi

dl="$deps/downloads"
mkdir -p "$dl"
wheel="$dl/$PA_WHEEL"
if [ ! -f "$wheel" ] || ! echo "$PA_SHA256  $wheel" | sha256sum -c --quiet - >/dev/null 2>&1; then
  rm -f "$wheel"
  req="$dl/perf-analyzer-requirements.txt"
  printf 'perf-analyzer==%s --hash=sha256:%s\n' "$PA_VERSION" "$PA_SHA256" >"$req"
  note "downloading $PA_WHEEL from PyPI"
  if ! "${pip_cmd[@]}" download --quiet --disable-pip-version-check \
      --no-deps --only-binary=:all: --platform "$PA_PLATFORM" \
      --python-version 3 --implementation py \
      --require-hashes -r "$req" -d "$dl" >"$dl/pip-download.log" 2>&1; then
    cat "$dl/pip-download.log" >&2
    die "pip download of perf-analyzer==$PA_VERSION ($PA_PLATFORM) failed"
  fi
  [ -f "$wheel" ] || die "pip download did not produce $wheel (got: $(ls "$dl"))"
fi
echo "$PA_SHA256  $wheel" | sha256sum -c --quiet - || die "sha256 mismatch for $wheel"

rm -rf "$pa_dir.tmp"
mkdir -p "$pa_dir.tmp"
python3 - "$wheel" "$pa_dir.tmp" <<'PY' || die "could not unpack $wheel"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
pa_bin_rel="perf_analyzer/bin/perf_analyzer"
[ -f "$pa_dir.tmp/$pa_bin_rel" ] || die "wheel has no $pa_bin_rel"
chmod 0755 "$pa_dir.tmp/$pa_bin_rel"
rm -rf "$pa_dir"
mv "$pa_dir.tmp" "$pa_dir"

# ------------------------------------------------ 2. newer glibc/libstdc++
# Reuse the Debian mirror the system is configured with (first URI ending in
# /debian in the system sources), falling back to deb.debian.org.
mirror=""
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -r "$f" ] || continue
  m="$(grep -vE '^[[:space:]]*#' "$f" 2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)"
  if [ -n "$m" ]; then
    mirror="${m%/}"
    break
  fi
done
[ -n "$mirror" ] || mirror="http://deb.debian.org/debian"

keyring=""
for k in /usr/share/keyrings/debian-archive-keyring.gpg /usr/share/keyrings/debian-archive-trixie-stable.gpg; do
  if [ -r "$k" ]; then keyring="$k"; break; fi
done
[ -n "$keyring" ] || die "no Debian archive keyring in /usr/share/keyrings (apt-get install debian-archive-keyring)"

mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d" \
  "$apt_dir/preferences.d" "$apt_dir/debs"
echo "deb [arch=amd64 target=Packages signed-by=$keyring] $mirror $DEBIAN_SUITE main" \
  >"$apt_dir/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::Etc::Preferences=$apt_dir/preferences"
  -o "Dir::Etc::PreferencesParts=$apt_dir/preferences.d"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "Acquire::Languages=none"
  -o "APT::Sandbox::User=root"
)
note "fetching ${DEBIAN_PACKAGES[*]} from $mirror ($DEBIAN_SUITE) into a project-local apt dir"
if ! apt-get "${apt_opts[@]}" -q update >"$apt_dir/update.log" 2>&1; then
  cat "$apt_dir/update.log" >&2
  die "apt-get update for $DEBIAN_SUITE (project-local lists in $apt_dir) failed"
fi
if grep -qE '^(W|E): ' "$apt_dir/update.log"; then
  grep -E '^(W|E): ' "$apt_dir/update.log" >&2
  die "apt-get update for $DEBIAN_SUITE reported problems"
fi
rm -f "$apt_dir/debs/"*.deb
if ! (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -q download "${DEBIAN_PACKAGES[@]}") \
    >"$apt_dir/download.log" 2>&1; then
  cat "$apt_dir/download.log" >&2
  die "apt-get download ${DEBIAN_PACKAGES[*]} from $DEBIAN_SUITE failed"
fi

rm -rf "$glibc_dir.tmp"
mkdir -p "$glibc_dir.tmp"
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  debs=("$apt_dir/debs/${pkg}_"*_amd64.deb)
  deb="${debs[0]}"
  [ -f "$deb" ] || die "apt-get download produced no .deb for $pkg"
  dpkg-deb -x "$deb" "$glibc_dir.tmp" || die "dpkg-deb -x $deb failed"
done
libdir_rel="usr/lib/x86_64-linux-gnu"
[ -f "$glibc_dir.tmp/$libdir_rel/ld-linux-x86-64.so.2" ] || die "no ld-linux-x86-64.so.2 in the extracted libc6"
# Merged-/usr packages ship no /lib64; add the conventional path for callers.
ln -sfn "$libdir_rel" "$glibc_dir.tmp/lib64"
rm -rf "$glibc_dir"
mv "$glibc_dir.tmp" "$glibc_dir"

ld_so="$glibc_dir/$libdir_rel/ld-linux-x86-64.so.2"
glibc_ver="$("$ld_so" --version 2>/dev/null | head -n 1 | grep -oE '[0-9]+\.[0-9]+' | tail -n 1 || true)"
case "$glibc_ver" in
  2.3[89] | 2.[4-9][0-9] | [3-9].*) ;;
  *) die "extracted glibc is '$glibc_ver', need >= 2.38" ;;
esac
grep -q "GLIBCXX_3.4.32" "$glibc_dir/$libdir_rel/libstdc++.so.6" ||
  die "extracted libstdc++ lacks GLIBCXX_3.4.32"

# ------------------------------------------------------------ 3. launcher
mkdir -p "$bin_dir"
cat >"$launcher.tmp" <<'SH'
#!/usr/bin/env bash
# Generated by scripts/install-perf-analyzer.sh: runs Triton's perf_analyzer
# (manylinux_2_38 wheel) through a project-local glibc's dynamic loader.
deps="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
libs="$deps/glibc-new/usr/lib/x86_64-linux-gnu"
exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs" --argv0 perf_analyzer \
  "$deps/perf-analyzer/perf_analyzer/bin/perf_analyzer" "$@"
SH
chmod 0755 "$launcher.tmp"
mv "$launcher.tmp" "$launcher"

if ! launcher_works; then
  "$launcher" --version >&2 || true
  die "the launcher $launcher does not run (see the error above)"
fi
rm -f "$deps"/.perf-analyzer-v*
touch "$stamp"
note "installed $("$launcher" --version 2>&1 | head -n 1) with glibc $glibc_ver"
echo "$launcher"
