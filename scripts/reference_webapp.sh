#!/usr/bin/env bash
# The reference project's own React web app (shared/reference/webapp), built against this service
# and served from another origin, so a browser drives our /v1 API across CORS.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/reference_webapp.sh [--build-only] [API_BASE_URL]

Copies the reference web app (read-only in shared/) into a cache directory, installs its
packages with `npm ci` (cached by the hash of its package-lock.json), builds it with
VITE_API_BASE_URL pointing at the service (cached by the hash of its sources and that URL),
and serves dist/ with `python3 -m http.server` until Ctrl-C. It prints the line that starts
the service with this origin in CORS_ORIGINS.

  API_BASE_URL        the service the web app calls
                      [VITE_API_BASE_URL; http://127.0.0.1:8000]
  --build-only        build (or reuse the cached build) and print the dist/ path; serve nothing
  -h, --help          show this help

Environment:
  WEBAPP_HOST             address to serve on [127.0.0.1]
  WEBAPP_PORT             port to serve on [5173]
  REFERENCE_WEBAPP_SRC    the web app's sources [<repo>/../shared/reference/webapp]
  REFERENCE_WEBAPP_CACHE  where installs and builds are kept
                          [${XDG_CACHE_HOME:-~/.cache}/consensus-engine/reference-webapp]

Needs node and npm (the npm registry) and python3.
EOF
}

say() { printf '%s\n' "reference_webapp: $*" >&2; }
die() {
    say "$*"
    exit 1
}

build_only=false
api_url="${VITE_API_BASE_URL:-http://127.0.0.1:8000}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --build-only) build_only=true ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) api_url="$1" ;;
    esac
    shift
done
[[ "$api_url" =~ ^https?://[^/]+ ]] || die "API_BASE_URL must be an http(s) URL, not '$api_url'"
api_url="${api_url%/}"

root="$(cd "$(dirname "$0")/.." && pwd)"
src="${REFERENCE_WEBAPP_SRC:-$root/../shared/reference/webapp}"
cache="${REFERENCE_WEBAPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consensus-engine/reference-webapp}"
host="${WEBAPP_HOST:-127.0.0.1}"
port="${WEBAPP_PORT:-5173}"

[[ -f "$src/package-lock.json" ]] || die "no web app at $src (set REFERENCE_WEBAPP_SRC)"
command -v npm >/dev/null || die "npm is not installed (Debian: apt-get install -y nodejs npm)"
command -v python3 >/dev/null || die "python3 is not installed"
src="$(cd "$src" && pwd)"
mkdir -p "$cache"

# One build at a time per cache (a test and a person may run this together).
exec 9>"$cache/.lock"
flock -w 900 9 || die "another build held $cache/.lock for 15 minutes"

# Packages: one install per lockfile, kept across runs.
lock_hash="$(sha256sum "$src/package-lock.json" | cut -c1-16)"
work="$cache/deps-$lock_hash"
if [[ ! -f "$work/node_modules/.ce-installed" ]]; then
    say "npm ci (package-lock.json $lock_hash) into $work"
    rm -rf "$work"
    mkdir -p "$work"
    cp "$src/package.json" "$src/package-lock.json" "$work/"
    started=$SECONDS
    (cd "$work" && npm ci --no-audit --no-fund --loglevel=error >&2)
    touch "$work/node_modules/.ce-installed"
    say "npm ci took $((SECONDS - started)) s"
fi

# Build: one per (sources, API URL), kept across runs; the newest few are kept.
src_hash="$(
    cd "$src"
    {
        printf 'VITE_API_BASE_URL=%s\n' "$api_url"
        find . -type f ! -path './node_modules/*' ! -path './dist/*' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
)"
dist="$cache/dist-$src_hash"
if [[ ! -f "$dist/.ce-built" ]]; then
    say "building for VITE_API_BASE_URL=$api_url"
    # The sources afresh beside the kept node_modules (shared/ is read-only, so no build there).
    find "$work" -mindepth 1 -maxdepth 1 ! -name node_modules -exec rm -rf {} +
    tar -C "$src" --exclude=./node_modules --exclude=./dist -cf - . | tar -C "$work" -xf -
    chmod -R u+w "$work"
    started=$SECONDS
    (cd "$work" && env VITE_API_BASE_URL="$api_url" npm run --silent build >&2)
    rm -rf "$dist" "$dist.tmp"
    cp -R "$work/dist" "$dist.tmp"
    touch "$dist.tmp/.ce-built"
    mv "$dist.tmp" "$dist"
    say "build took $((SECONDS - started)) s"
    # Keep the five newest builds.
    find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'dist-*' -printf '%T@ %p\n' |
        sort -rn | tail -n +6 | cut -d' ' -f2- | xargs -r rm -rf
else
    touch "$dist/.ce-built"
    say "cached build for VITE_API_BASE_URL=$api_url"
fi
flock -u 9
exec 9>&-

if $build_only; then
    printf '%s\n' "$dist"
    exit 0
fi

origin="http://$host:$port"
[[ "$host" == *:* ]] && origin="http://[$host]:$port"
cat <<EOF

The web app calls $api_url. Start the service with this origin allowed, in another terminal:

    CORS_ORIGINS=$origin make run

then open $origin/ (the origin must match exactly: http://localhost:$port is another one).
Serving $dist on $origin; Ctrl-C stops it.

EOF
exec python3 -m http.server "$port" --bind "$host" --directory "$dist"
