"""``minikproxy explain`` and ``minikproxy diff``: what the compiled rules do to one packet.

One evaluator per rule format reads the rules a mode renders (``iptables.py``: restore
text; ``nft.py``: ``nft -f`` scripts of both nftables layouts), and ``engine.py`` walks a
packet through the netfilter hooks with them. ``reasons.py`` names the Kubernetes causes
from the model; the verdict, endpoints and masquerading come from the rules only.
"""
