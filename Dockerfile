# syntax=docker/dockerfile:1.7
# One image for every spur role (learner, actor, reward-service): `make image`.
#
# The build stage runs the Makefile itself: `make setup` makes /opt/spur/.venv with
# the pinned torch wheel and the env bridge's packages, `make build` compiles spur
# against that torch with LIBTORCH_USE_PYTORCH=1. The binary's run path points at
# /opt/spur/.venv/.../torch/lib, so the runtime stage keeps the venv at that path (on
# the same Debian release, whose python3 the venv links to).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/spur
ENV CARGO_INCREMENTAL=0
# torch (4.7 GB with its CUDA libraries) and the bridge's packages first, so a code
# change does not download them again.
COPY Makefile ./
COPY bridge/python/ bridge/python/
COPY proto/spur/v1/env.proto proto/spur/v1/env.proto
RUN make setup
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/opt/spur/target,sharing=locked \
    make build \
 && install -D -m 0755 target/release/spur /opt/spur/bin/spur

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 spur \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin spur
WORKDIR /opt/spur
# The venv at the path the binary's run path names; the bridge is installed editable
# from /opt/spur/bridge/python, so it keeps its path too.
COPY --from=build /opt/spur/.venv /opt/spur/.venv
COPY --from=build /opt/spur/bridge/python /opt/spur/bridge/python
COPY --from=build /opt/spur/bin/spur /opt/spur/bin/spur
# Read relative to the working directory: prompts and rules by the reward service,
# configs by whoever passes --config configs/....
COPY prompts/ prompts/
COPY judges/ judges/
COPY configs/ configs/
ENV VIRTUAL_ENV=/opt/spur/.venv \
    PATH=/opt/spur/bin:/opt/spur/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1
# Fail the build, not the pod, when a library is missing (libtorch_cpu.so: cannot open
# shared object file), torch's CUDA backend would not load (the gpu overlays need it;
# the build has no GPU, so a tensor on cuda:0 is not asked for) or the bundled files
# do not fit the config.
RUN set -eu; \
    if ldd /opt/spur/bin/spur | grep -F 'not found'; then \
      echo "spur cannot find the libraries above" >&2; exit 1; \
    fi; \
    spur --version; \
    spur devices | tee /dev/stderr | grep -qF "torch's CUDA library: loaded"; \
    python -c "import spur_bridge, torch; print('torch', torch.__version__)"; \
    for role in learner actor reward-service; do \
      spur "$role" --config configs/keyroom-oni.toml --check-config > /dev/null; \
    done
USER 10001:10001
ENTRYPOINT ["/opt/spur/bin/spur"]
CMD ["--help"]
