#!/usr/bin/env bash
# Set up this machine for the tests and the demo. Run as root from any directory.
#
# Steps, each skipped when its result is already there:
#   1. Debian packages: prometheus (its packaged service stays off), plus Java 17
#      and Maven when missing.
#   2. The virtualenv .venv with the package and its test extra, reinstalled when
#      pyproject.toml changes.
#   3. The Kafka broker jars from Maven, in .cache/kafka/lib.
#   4. OpenVINO telemetry declined in its consent file, so no OpenVINO tool sends usage data.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
cd "$ROOT"

log() { echo "setup: $*"; }

# 1. Debian packages
missing_packages=()
command -v prometheus >/dev/null || missing_packages+=(prometheus)
command -v java >/dev/null || missing_packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing_packages+=(maven)
if ((${#missing_packages[@]})); then
    log "installing Debian packages: ${missing_packages[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing_packages[@]}"
    # stack.py runs its own Prometheus on a loopback port. The packaged service would
    # listen on every address at port 9090, so it is turned off where systemd runs.
    if [[ " ${missing_packages[*]} " == *" prometheus "* ]] && [[ -d /run/systemd/system ]]; then
        systemctl disable --now prometheus.service || log "could not disable prometheus.service"
    fi
fi

# 2. Virtualenv
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
install_stamp="$VENV/.caption-worker-installed"
if ! cmp -s pyproject.toml "$install_stamp"; then
    log "installing the package with the test extra into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    cp pyproject.toml "$install_stamp"
fi

# 3. Kafka jars
"$VENV/bin/python" deploy/local/stack.py kafka-jars

# 4. OpenVINO telemetry. The converters of openvino-telemetry 2025.2 send events unless
# the consent file ~/intel/openvino_telemetry contains "0", and a missing file counts
# as consent. Its `opt_in_out --opt_out` command would send one last opt-out event
# first, so the package's own checker writes the file instead.
"$VENV/bin/python" - <<'EOF'
from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

checker = OptInChecker()
if checker.check(enable_opt_in_dialog=False) != ConsentCheckResult.DECLINED or checker.consent_file_is_empty():
    if not checker.update_result(ConsentCheckResult.DECLINED):
        raise SystemExit(f"setup: could not write {checker.consent_file()}, so OpenVINO telemetry is still on")
    print(f"setup: OpenVINO telemetry declined in {checker.consent_file()}")
EOF

bash deploy/local/install-helm.sh

log "done"
