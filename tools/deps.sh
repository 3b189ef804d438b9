#!/usr/bin/env bash
# Dependency drift, found on purpose rather than by users.
#
#   tools/deps.sh latest   fresh venv with the newest versions pyproject.toml allows (no lock),
#                          run the whole suite, show what differs from constraints.txt
#   tools/deps.sh lock     the same, and when the suite passes, write those versions to
#                          constraints.txt (the lock the README and .ci/run install with)
#
# The venv lives in .venv-latest (ignored by git). See docs/dependencies.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
if [ "$mode" != latest ] && [ "$mode" != lock ]; then
  echo "usage: tools/deps.sh latest|lock" >&2
  exit 2
fi
rm -rf .venv-latest
python3 -m venv .venv-latest
. .venv-latest/bin/activate
python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev,hf]'
frozen="$(mktemp)"
{
  echo "# The tested set of versions: produced by tools/deps.sh lock from a passing run of the suite"
  echo "# ($(python -c 'import platform; print(platform.system(), platform.machine(), "Python", platform.python_version())'))."
  echo "# torch is pinned without its local label (+cpu, +cu128): the same release from either index."
  python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -vi '^hap\b'
} > "$frozen"
echo "== versions that differ from constraints.txt (- locked, + newest allowed):"
diff <(grep -v '^#' constraints.txt | sort -f) <(grep -v '^#' "$frozen" | sort -f) | grep '^[<>]' \
  | sed 's/^</-/; s/^>/+/' || echo "   none"
echo "== running the suite against the newest allowed versions"
set +e
python -m pytest -q
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "the suite fails with the newest allowed versions (pytest exit $rc): fix hap or tighten an upper" \
       "bound in pyproject.toml; constraints.txt is unchanged" >&2
  exit "$rc"
fi
if [ "$mode" = lock ]; then
  mv "$frozen" constraints.txt
  echo "wrote constraints.txt"
else
  rm -f "$frozen"
fi
