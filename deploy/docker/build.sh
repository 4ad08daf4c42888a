#!/usr/bin/env bash
# Build the poolfleet container image. Used by `make cluster` and by the compose test.
#
#   deploy/docker/build.sh            builds $POOLFLEET_IMAGE and prints its tag on stdout
#
# The image build itself reaches no registry and no package index:
#   1. wheels: the project wheel (`pip wheel`) and wheels of its dependencies for the
#      image's Python (`pip download --only-binary`) are made on the host into
#      build/docker/wheels; the Dockerfile installs them with `pip --no-index`.
#   2. base image: $POOLFLEET_BASE_IMAGE. One named poolfleet-base* (the default is
#      poolfleet-base:bookworm) is made locally once, Debian bookworm by debootstrap
#      from the host's apt mirror, then `docker import`, and reused while the tag
#      exists. Any other base that has python3 with the venv module works too, e.g.
#      POOLFLEET_BASE_IMAGE=python:3.11-slim-bookworm on a host that may pull from a registry.
#   3. docker build of deploy/docker/Dockerfile on that base.
#
# Settings (environment):
#   POOLFLEET_IMAGE          tag of the image to build               [poolfleet:latest]
#   POOLFLEET_BASE_IMAGE     base image                               [poolfleet-base:bookworm]
#   POOLFLEET_BASE_PACKAGES  Debian packages added to a poolfleet-base* image, comma-separated
#                            (python3 and python3-venv are always in)   []
#   POOLFLEET_IMAGE_PYTHON   Python version in the base image         [3.11, bookworm's]
#   POOLFLEET_DEBIAN_MIRROR  mirror for debootstrap                   [the host's apt mirror]
#   PYTHON                   host Python whose pip fetches the wheels [python3]
#
# Building the default base needs root (debootstrap) the first time.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
image="${POOLFLEET_IMAGE:-poolfleet:latest}"
base="${POOLFLEET_BASE_IMAGE:-poolfleet-base:bookworm}"
image_python="${POOLFLEET_IMAGE_PYTHON:-3.11}"
python="${PYTHON:-python3}"
work="$root/build/docker"
ctx="$work/context"

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine is reachable (is dockerd running, may this user use it?)"

mkdir -p "$work"
# One build at a time per checkout (a test and `make cluster` may overlap).
exec 9>"$work/.lock"
if command -v flock >/dev/null; then flock 9; fi

# -- base image ------------------------------------------------------------------
debian_mirror() {
    # The first http(s) Debian mirror the host's apt uses for bookworm (deb822 or
    # one-line format), so debootstrap reaches what apt reaches.
    local uri=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        uri="$(awk '
            /^URIs:/ { uris = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") ok = 1 }
            /^$/ { if (ok && uris != "") { print uris; exit } ok = 0; uris = "" }
            END { if (ok && uris != "") print uris }
        ' /etc/apt/sources.list.d/*.sources | head -n1)"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    [[ "$(id -u)" == 0 ]] || die "building $base with debootstrap needs root; run as root once, or set POOLFLEET_BASE_IMAGE to an image with python3 and its venv module"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local mirror rootfs started
    mirror="${POOLFLEET_DEBIAN_MIRROR:-$(debian_mirror)}"
    rootfs="$(mktemp -d "$work/rootfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" EXIT
    started=$SECONDS
    local include="python3,python3-venv${POOLFLEET_BASE_PACKAGES:+,$POOLFLEET_BASE_PACKAGES}"
    say "making $base: debootstrap bookworm with $include from $mirror (once; takes a minute or two)"
    debootstrap --variant=minbase --include="$include" bookworm "$rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || die "debootstrap failed, see $work/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    tar --numeric-owner -C "$rootfs" -c . |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "made $base in $((SECONDS - started)) s"
}

if docker image inspect "$base" >/dev/null 2>&1; then
    say "base image $base is present"
elif [[ "$base" == poolfleet-base* ]]; then
    build_base
else
    say "base image $base is not present locally; docker build will pull it"
fi

# -- wheels ----------------------------------------------------------------------
# Kept in build/docker/wheels between runs: the project wheel is rebuilt when a
# source file changes, the dependency wheels when pyproject.toml does.
wheels="$work/wheels"
arch="$(uname -m)"
src_key="$(cd "$root" && find pyproject.toml common master worker client -type f \
    \( -name '*.py' -o -name '*.toml' -o -name py.typed \) -print0 | sort -z | xargs -0 sha256sum |
    sha256sum | cut -c1-16)"
deps_key="$({ sha256sum <"$root/pyproject.toml"; echo "$image_python $arch"; } | sha256sum | cut -c1-16)"
if [[ ! -f "$wheels/.deps-$deps_key" ]]; then
    rm -rf "$wheels"
fi
mkdir -p "$wheels"
if [[ ! -f "$wheels/.src-$src_key" ]]; then
    say "building the poolfleet wheel"
    rm -f "$wheels"/poolfleet-*.whl "$wheels"/.src-*
    # A fixed timestamp makes the wheel byte-identical while the sources are, so
    # docker build reuses its cached layers.
    SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        --wheel-dir "$wheels" "$root"
    touch "$wheels/.src-$src_key"
fi
if [[ ! -f "$wheels/.deps-$deps_key" ]]; then
    # Dependencies as binary wheels for the image's Python and glibc, whatever the host runs.
    platforms=(--platform "manylinux2014_$arch")
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
    pyver="${image_python//./}"
    say "fetching dependency wheels for CPython $image_python on $arch"
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$wheels" \
        --only-binary=:all: --python-version "$image_python" --implementation cp --abi "cp$pyver" \
        "${platforms[@]}" "$wheels"/poolfleet-*.whl
    touch "$wheels/.deps-$deps_key"
fi

rm -rf "$ctx"
mkdir -p "$ctx/wheels"
cp "$wheels"/*.whl "$ctx/wheels/"
cp "$here/Dockerfile" "$here/cluster_check.py" "$ctx/"

# -- image -----------------------------------------------------------------------
say "building $image on $base"
# Name the install stage too, so that its layers stay cached (not dangling) and
# earlier builds of both stages, now dangling, can be pruned.
last="${image##*/}"
if [[ "$last" == *:* ]]; then stage_tag="$image-install"; else stage_tag="$image:latest-install"; fi
# The classic builder works offline with a local base image on every engine version.
for target in install final; do
    if [[ "$target" == install ]]; then args=(--target install --tag "$stage_tag"); else args=(--tag "$image"); fi
    if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE_IMAGE=$base" "${args[@]}" "$ctx" \
        >"$work/docker-build.log" 2>&1; then
        tail -n 40 "$work/docker-build.log" >&2
        die "docker build failed, see $work/docker-build.log"
    fi
done
docker image prune --force --filter "label=org.poolfleet.image" >/dev/null || true
say "built $image"
echo "$image"
