#!/usr/bin/env bash
# The fast tier (pytest -m fast) under the oldest Python that setup.cfg declares and
# under the newest Python on this machine, each in a venv of its own (.venv-py3X, built
# by `make install PYTHON=... VENV=...` and reused while setup.cfg is unchanged).
# A missing interpreter is a note here; under CI=true it fails.
#
#   bash tests/infra/pythons.sh            from the repository's root (make test does it)
set -euo pipefail

oldest=$(sed -n 's/^python_requires *= *>= *\([0-9][0-9.]*\).*/\1/p' setup.cfg)
[ -n "$oldest" ] || { echo "setup.cfg declares no python_requires = >=3.X" >&2; exit 1; }
pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")

# An interpreter of version X.Y that runs (pyenv's shims on PATH do not, without
# PYENV_VERSION: hence its versions' own binaries too).
find_python() {
	local version=$1 candidate
	for candidate in "python$version" "$pyenv_root"/versions/"$version".*/bin/"python$version" \
		"/usr/bin/python$version" "/usr/local/bin/python$version"; do
		if command -v "$candidate" >/dev/null 2>&1 && [ "$("$candidate" -c \
			'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
			command -v "$candidate"; return 0
		fi
	done
	return 1
}

newest=
for minor in $(seq 40 -1 "${oldest#3.}"); do
	if find_python "3.$minor" >/dev/null; then newest=3.$minor; break; fi
done

status=0
for version in $(printf '%s\n' "$oldest" "$newest" | sed '/^$/d' | sort -u -V); do
	python=$(find_python "$version") || {
		message="Python $version (the oldest that setup.cfg declares) is not on this machine"
		if [ "${CI:-}" = true ]; then echo "$message (required under CI=true)" >&2; exit 1; fi
		echo "note: $message: its fast tier is skipped (install it, e.g. with pyenv)" >&2
		continue
	}
	venv=.venv-py${version//./}
	echo "== the fast tier under Python $version ($python, $venv)"
	log=$(mktemp)
	make --no-print-directory install PYTHON="$python" VENV="$venv" >"$log" 2>&1 || {
		echo "make install PYTHON=$python VENV=$venv failed:" >&2; tail -20 "$log" >&2
		rm -f "$log"; exit 1
	}
	rm -f "$log"
	"$venv/bin/python" -m pytest -m fast -q -p no:cacheprovider || status=1
done
exit $status
