# syntax=docker/dockerfile:1
#
# The app image of the enclave: what `enclaver build` wraps (`sources.app` in enclaver.yaml) or
# `nitro-cli build-enclave` turns into an EIF. Step by step: docs/deploying.md.
#
#   docker build -t no-fly-list:latest .
#   docker build --target odyn-shim -t enclave-sidecar-odyn-shim:latest .   # for `enclaver build` only
#
# Every byte of the final stage is measured into PCR0: this file, the pinned base and
# deploy/constraints.txt decide what the KMS key policy trusts.
#
# The base is pinned by its full version. Pin it by digest as well for production builds:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm     # prints sha256:...
# and write python:3.11.13-slim-bookworm@sha256:<that digest> in both FROM lines. No digest is written
# here because none could be looked up where this file was made; an invented one would be worse.

# --------------------------------------------------------------------------- build: wheels only
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt deploy/constraints.txt
COPY sidecar sidecar
COPY plugins plugins
# The project becomes one wheel. Its dependencies are taken only as prebuilt wheels (--only-binary)
# at the versions in deploy/constraints.txt: no compiler is needed and no dependency's setup.py runs.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip wheel --only-binary=:all: --constraint deploy/constraints.txt \
        --wheel-dir /wheels /wheels/enclave_sidecar-*.whl

# --------------------------------------------------------------------------- odyn-shim (Enclaver)
# Only the shim file, for enclaver.yaml `sources.supervisor`: Enclaver copies /usr/local/bin/odyn out
# of this image into the enclave, where it execs `sidecar run` instead of starting odyn's own proxies.
FROM scratch AS odyn-shim
COPY --chmod=0555 deploy/odyn-shim /usr/local/bin/odyn

# --------------------------------------------------------------------------- app: the enclave image
FROM python:3.11.13-slim-bookworm AS app
# Explicit config paths: inside the enclave the working directory is "/", whatever WORKDIR says.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml \
    SIDECAR_MANIFEST=/etc/enclaver/enclaver.yaml
# Install from the wheels alone (--no-index: nothing else is fetched), then remove the installers:
# nothing at run time needs pip, setuptools or wheel. The link puts `sidecar` on the PATH that
# nitro-cli's init searches (/sbin:/usr/sbin:/bin:/usr/bin), which lacks /usr/local/bin.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels enclave-sidecar \
 && python -m pip uninstall --yes pip setuptools wheel \
 && ln -s /usr/local/bin/sidecar /usr/bin/sidecar
# A non-root user for every runtime that honours USER (docker run, Kubernetes). Inside a Nitro
# Enclave, nitro-cli's init and Enclaver's odyn both start the entrypoint as root whatever USER says;
# see "What runs as whom" in docs/deploying.md.
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid sidecar --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar \
 && install -d -o sidecar -g sidecar -m 0700 /etc/sidecar/.sidecar-state
# Root-owned and read-only to the sidecar: config is part of the measurement, not state.
# state_dir in sidecar.yaml (.sidecar-state) resolves next to it, to the directory made above.
COPY sidecar.yaml /etc/sidecar/sidecar.yaml
# `enclaver build` adds the same file here; `nitro-cli build-enclave` does not, so the image has it.
COPY enclaver.yaml /etc/enclaver/enclaver.yaml
WORKDIR /etc/sidecar/.sidecar-state
USER 10001:10001
ENTRYPOINT ["sidecar", "run"]
