# minikproxy: a Python implementation of kube-proxy, as a node agent image.
#
#   docker build -t minikproxy:0.1.0 .            (or podman build)
#
# Behind a TLS-intercepting proxy, or with a private package index, give the build your CA
# bundle (a PEM file of every CA to trust, e.g. /etc/ssl/certs/ca-certificates.crt) as the
# build secret `ca-bundle`, and the index as the PIP_INDEX_URL build argument:
#
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg PIP_INDEX_URL=https://pypi.example/simple -t minikproxy:0.1.0 .
#
# The secret is used by pip and apt during the build and is not stored in any layer.
#
# Two stages on the same base (so the venv built in the first runs unchanged in the second):
# the builder turns the project and its dependencies into wheels and installs them into a
# venv; the final image gets that venv plus Debian's python3 and the netfilter userland,
# and nothing else (no compiler, no pip, no apt lists, no wheel files, no caches).
# The base is pinned by tag; pin it by digest (debian:12-slim@sha256:...) where you build.

FROM debian:12-slim AS builder
# ARG, not ENV: build-time settings that must not leak into the image's environment.
ARG DEBIAN_FRONTEND=noninteractive
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian package versions are not pinned (DL3008): Debian 12 point releases replace them and
# remove the old versions from the archive, so a pinned build would break at the next one.
# The tag pins the release; security updates within it are wanted.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle \
    ca=/run/secrets/ca-bundle; [ -s "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt; \
    apt-get -o Acquire::https::CaInfo="$ca" update \
    && apt-get -o Acquire::https::CaInfo="$ca" install -y --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the wheel needs (see .dockerignore): pyproject.toml, README.md, src/.
COPY pyproject.toml README.md ./
COPY src ./src
# kubernetes >= 32 ships an asyncio client (kubernetes/aio, ~70 MB) and depends on aiohttp for
# it; minikproxy uses the synchronous client only, so both are removed (the import check at
# the end and the image test prove the rest still works).
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python3 -m venv /opt/minikproxy \
    && /opt/minikproxy/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/minikproxy/bin/pip wheel --no-cache-dir --wheel-dir /wheels /wheels/minikproxy-*.whl \
    && /opt/minikproxy/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        /wheels/minikproxy-*.whl \
    && rm -rf /opt/minikproxy/lib/python3*/site-packages/kubernetes/aio \
    && /opt/minikproxy/bin/python -m pip uninstall -y -q aiohttp aiohttp-retry \
        aiohappyeyeballs aiosignal frozenlist multidict yarl propcache attrs \
    && /opt/minikproxy/bin/python -m pip uninstall -y -q pip setuptools \
    && /opt/minikproxy/bin/python -c 'import kubernetes.client, kubernetes.config, kubernetes.watch' \
    && /opt/minikproxy/bin/minikproxy --version

FROM debian:12-slim
ARG VERSION=0.1.0
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="minikproxy" \
      org.opencontainers.image.description="A Python implementation of kube-proxy (iptables mode)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:12-slim"
# python3 is Debian 12's (3.11), the interpreter the builder's venv was made with.
# iptables ships both backends (iptables-nft, iptables-legacy) and ip6tables; --iptables-backend
# picks one at run time. nftables, ipset, ipvsadm and iproute2 are the rest of the userland
# kube-proxy's modes use; conntrack is for people debugging (minikproxy talks ctnetlink itself).
# Versions unpinned on purpose: see the builder stage (DL3008).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle \
    ca=/run/secrets/ca-bundle; [ -s "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt; \
    apt-get -o Acquire::https::CaInfo="$ca" update \
    && apt-get -o Acquire::https::CaInfo="$ca" install -y --no-install-recommends \
        python3 iptables nftables ipset conntrack ipvsadm iproute2 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/cache/debconf/*-old \
        /var/log/apt /var/log/dpkg.log
COPY --from=builder /opt/minikproxy /opt/minikproxy
# The DaemonSet runs with readOnlyRootFilesystem: never try to write .pyc files at run time
# (pip compiled them at install time, so imports do not pay for compiling).
ENV PATH=/opt/minikproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# No USER: the proxy must run as root. It programs the host's netfilter from the host network
# namespace (hostNetwork), which takes CAP_NET_ADMIN (and CAP_NET_RAW for legacy iptables'
# raw socket) in the initial user namespace, and it writes the host's root-owned
# /run/xtables.lock. A non-root user would need ambient capabilities and a chown of the host's
# lock file; the DaemonSet instead runs it as root with every capability dropped except
# NET_ADMIN and NET_RAW, no privilege escalation and a read-only root filesystem.
ENTRYPOINT ["minikproxy"]
CMD ["run"]
