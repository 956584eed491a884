#!/usr/bin/env bash
# Redraw docs/rulegraph.png, the rule graph of the README: every rule of the
# tiny survey with difference imaging and association on (the default run is
# the same graph less those stages). Needs Graphviz's `dot` (Debian: graphviz).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v dot >/dev/null || { echo "rulegraph.sh: needs Graphviz's dot (apt-get install graphviz)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'sim: {preset: tiny}\ndiffim: {enabled: true}\n' > "$work/override.yaml"
.venv/bin/snakemake -s Snakefile -d "$work" --configfile "$work/override.yaml" --rulegraph \
    | dot -Tpng -Gdpi=70 -o docs/rulegraph.png
echo "wrote docs/rulegraph.png"
