#!/usr/bin/env bash
# Install the Helm CLI into <repo>/.cache/bin from the Go module proxy.
#
# The chart tests (tests/test_helm.py) run `helm lint` and `helm template`
# with this binary. `go install` builds it from source, which takes a few
# minutes on the first run. Later runs skip the build when the same version
# is already installed.
set -euo pipefail

HELM_VERSION="v4.3.2"

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="${repo_dir}/.cache/bin"
helm_bin="${bin_dir}/helm"

if [[ -x "${helm_bin}" ]] && "${helm_bin}" version --template '{{.Version}}' 2>/dev/null | grep -qx "${HELM_VERSION}"; then
    echo "helm ${HELM_VERSION} is already installed at ${helm_bin}"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "error: go not found on PATH; install Go 1.26 or newer (required by helm ${HELM_VERSION}), then run $0 again" >&2
    exit 1
fi

mkdir -p "${bin_dir}"
echo "installing helm ${HELM_VERSION} into ${bin_dir} with go install"

# The version ldflag makes `helm version` print the release instead of a development tag,
# which is also what the check above compares.
GOBIN="${bin_dir}" go install \
    -ldflags "-X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"

"${helm_bin}" version
