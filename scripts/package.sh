#!/usr/bin/env bash
# Build the deb or rpm of consolegate from the release binary:
#   scripts/package.sh deb|rpm
# The binary must exist (make deb / make rpm build it first). Packages land in
# $PKG_OUT (default target/packages). PKG_RELEASE (default 1) is the
# package revision: the install tests build a second, newer one to upgrade
# to. Lints the result (lintian / rpmlint) and fails on any error.
set -euo pipefail

kind=${1:?usage: package.sh deb|rpm}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${PKG_OUT:-$root/target/packages}
mkdir -p "$out"
out=$(cd "$out" && pwd)
release=${PKG_RELEASE:-1}
bin=${PKG_BINARY:-$root/target/release/consolegate}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)

[ -x "$bin" ] || { echo "package.sh: $bin missing: run cargo build --release first" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d "$out/.build-$kind.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Everything the packages install, under one directory.
stage_files() {
    local s=$1
    mkdir -p "$s/completions" "$s/limits.d"
    install -m 0755 "$bin" "$s/consolegate"
    "$bin" manpage > "$s/consolegate.1"
    "$bin" completions bash > "$s/completions/consolegate"
    "$bin" completions zsh > "$s/completions/_consolegate"
    "$bin" completions fish > "$s/completions/consolegate.fish"
    cp "$root/packaging/consolegate.toml" "$s/"
    cp "$root/packaging/consolegate.service" "$root/packaging/consolegate.sysusers" \
        "$root/packaging/consolegate.tmpfiles" "$s/"
    cp "$root/tuning/99-consolegate.conf" "$s/"
    cp "$root/tuning/limits.conf" "$s/limits.d/consolegate.conf"
    cp "$root/docs/PACKAGING.md" "$s/"
}

build_deb() {
    local src=$work/consolegate-$version
    mkdir -p "$src"
    stage_files "$src/stage"
    cp -r "$root/packaging/debian" "$src/debian"
    for f in service sysusers tmpfiles; do
        cp "$root/packaging/consolegate.$f" "$src/debian/consolegate.$f"
    done
    if [ "$release" != 1 ]; then
        # A newer revision on top of the packaged changelog.
        { printf 'consolegate (%s-%s) unstable; urgency=medium\n\n  * Rebuild.\n\n' "$version" "$release"
          printf ' -- %s  %s\n\n' "$(sed -n 's/^Maintainer: //p' "$root/packaging/debian/control")" "$(date -R)"
          cat "$root/packaging/debian/changelog"; } > "$src/debian/changelog"
    fi
    (cd "$src" && DEB_BUILD_OPTIONS=noddebs dpkg-buildpackage -b -us -uc --no-sign >"$work/build.log" 2>&1) \
        || { tail -40 "$work/build.log" >&2; exit 1; }
    local deb
    deb=$(ls "$work"/consolegate_*.deb)
    mv "$deb" "$out/"
    deb=$out/$(basename "$deb")
    echo "$deb"
    lintian --fail-on error,warning "$deb"
}

build_rpm() {
    local s=$work/stage spec=$work/consolegate.spec
    stage_files "$s"
    cp "$root/packaging/rpm/consolegate.spec" "$spec"
    if [ "$release" != 1 ]; then
        # A newer revision on top of the packaged changelog.
        local packager
        packager=$(sed -n 's/^Packager: *//p' "$spec")
        sed -i "/^%changelog\$/a * $(LC_ALL=C date -u +'%a %b %d %Y') $packager - $version-$release\\n- Rebuild.\\n" "$spec"
    fi
    rpmbuild -bb --quiet \
        --define "_topdir $work/rpmbuild" \
        --define "cg_stage $s" \
        --define "cg_version $version" \
        --define "cg_release $release" \
        "$spec" >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log" >&2; exit 1; }
    local rpm
    rpm=$(ls "$work"/rpmbuild/RPMS/*/consolegate-*.rpm)
    mv "$rpm" "$out/"
    rpm=$out/$(basename "$rpm")
    echo "$rpm"
    # Clean means no error and no warning either (each filter in the
    # rpmlintrc says why).
    rpmlint -r "$root/packaging/rpm/consolegate.rpmlintrc" "$rpm" | tee "$work/rpmlint.log"
    ! grep -q ': [EW]: ' "$work/rpmlint.log" || { echo "package.sh: rpmlint is not clean" >&2; exit 1; }
}

case $kind in
deb) build_deb ;;
rpm) build_rpm ;;
*) echo "package.sh: deb or rpm, not $kind" >&2; exit 2 ;;
esac
