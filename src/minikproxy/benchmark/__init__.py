"""The proxy-mode trade-off benchmark behind ``minikproxy bench`` (and the pytest-benchmark
suite under ``bench/``): synthetic kube-proxy-shaped clusters, one small adapter per proxy
mode, measurements in real network namespaces, and the results/report writers.

Modules: :mod:`.stats` (summaries), :mod:`.results` (records, results.json), :mod:`.cluster`
(the synthetic clusters and the Services traffic goes to), :mod:`.adapters` (one per mode:
build, compile, ruleset size), :mod:`.measure` (compile, first load and data path of one
mode at one size, and the scratch namespaces), :mod:`.kmem` (the legacy backend's rule-blob
size), :mod:`.probing` (TCP probes from the client namespace), :mod:`.live` (the real
controller: first sync, RSS, update latency), :mod:`.strategies` (iptables-restore against
python-iptables), :mod:`.ipvsvm` (IPVS's kernel parts in the IPVS VM), :mod:`.shield`
(cleanups an interrupt cannot cut short), :mod:`.report` (Markdown and plots), :mod:`.runner`
(the whole run).
"""

#: Every mode ``minikproxy bench`` knows (a mode without an adapter is reported as skipped).
ALL_MODES = ("iptables", "iptables-legacy", "nftables", "nftables-kube-proxy", "ipvs")
#: Services per cluster by default.
DEFAULT_SIZES = (1000, 5000, 10000)
