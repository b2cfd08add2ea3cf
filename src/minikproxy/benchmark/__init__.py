"""The proxy-mode trade-off benchmark behind ``minikproxy bench`` (and the pytest-benchmark
suite under ``bench/``): synthetic kube-proxy-shaped clusters, one small adapter per proxy
mode, measurements in real network namespaces, and the results/report writers.

Modules: :mod:`.stats` (summaries), :mod:`.results` (records, results.json), :mod:`.cluster`
(the synthetic clusters), :mod:`.adapters` (one per mode), :mod:`.loads` (compile and first
load), :mod:`.datapath` (connect latency and rate), :mod:`.live` (the real controller:
update latency and RSS), :mod:`.strategies` (iptables apply strategies), :mod:`.report`
(Markdown and plots), :mod:`.runner` (the whole run).
"""

#: Every mode ``minikproxy bench`` knows (a mode without an adapter is reported as skipped).
ALL_MODES = ("iptables", "iptables-legacy", "nftables", "nftables-kube-proxy", "ipvs")
#: Services per cluster by default.
DEFAULT_SIZES = (1000, 5000, 10000)
