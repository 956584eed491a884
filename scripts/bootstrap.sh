#!/usr/bin/env bash
# Create (or update) the project's virtual environment, then run the workflow
# or the tests. Idempotent: a second call reuses the environment.
#
#   bash scripts/bootstrap.sh workflow [snakemake args...]   # default survey, end to end
#   bash scripts/bootstrap.sh test     [pytest args...]      # lint + test suite
#
# Needs only python3 (>= 3.11) and the package registries. On Debian the venv
# module is a separate package (python3-venv); as root it is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv

if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bootstrap: installing python3-venv (Debian ships it separately)" >&2
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv "$venv"
        else
            echo "bootstrap: '$python -m venv' failed; install your distribution's python3-venv" >&2
            exit 1
        fi
    fi
fi

# Reinstall only when the dependency declarations change.
stamp="$venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "bootstrap: installing dependencies into $venv" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c constraints.txt -e '.[test]'
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
    workflow)
        exec "$venv/bin/snakemake" "$@"
        ;;
    test)
        # The report test opens the QA report in a real browser: Debian's Chromium
        # (driven by Playwright, which downloads nothing with an explicit browser).
        if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bootstrap: installing chromium (Debian) for the report test" >&2
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
                || echo "bootstrap: chromium could not be installed; the report test will fail" >&2
        fi
        export DC2_REQUIRE_BROWSER=1
        "$venv/bin/ruff" check .
        "$venv/bin/ruff" format --check .
        "$venv/bin/mypy"
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/bootstrap.sh {workflow|test} [args...]" >&2
        exit 2
        ;;
esac
