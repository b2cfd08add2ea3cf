"""An in-memory :class:`~minikproxy.dataplane.ipvs.IpvsKernel` for unit tests: services with
their real servers (connection counts settable), ipsets and the dummy device's addresses, with
a log of every write."""

from __future__ import annotations

from dataclasses import dataclass, field

from minikproxy.compile.ipvs import IpsetInfo, RealServer, VirtualServer
from minikproxy.dataplane.ipvs import DestKey, DestState, ServiceKey, ServiceState
from minikproxy.model.names import IPFamily


@dataclass
class FakeIpvsKernel:
    """Kernel state as plain dictionaries; ``log`` lists each write as a short string,
    ``table_reads`` each read of a whole table (every virtual server, set or address)."""

    services_: dict[ServiceKey, ServiceState] = field(default_factory=dict)
    dests_: dict[ServiceKey, dict[DestKey, DestState]] = field(default_factory=dict)
    sets: dict[str, set[str]] = field(default_factory=dict)
    dummy: bool = False
    bound: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    table_reads: list[str] = field(default_factory=list)

    def services(self) -> dict[ServiceKey, ServiceState]:
        self.table_reads.append("services")
        return dict(self.services_)

    def service(self, key: ServiceKey) -> ServiceState | None:
        return self.services_.get(key)

    def dests(self, key: ServiceKey) -> dict[DestKey, DestState]:
        return dict(self.dests_.get(key, {}))

    def add_service(self, vs: VirtualServer) -> None:
        if vs.key in self.services_:
            raise FileExistsError(vs.key)
        self.services_[vs.key] = ServiceState(*vs.settings())
        self.dests_[vs.key] = {}
        self.log.append(f"add-service {vs.key}")

    def update_service(self, vs: VirtualServer) -> None:
        self.services_[vs.key] = ServiceState(*vs.settings())
        self.log.append(f"update-service {vs.key}")

    def delete_service(self, key: ServiceKey) -> None:
        del self.services_[key]
        self.dests_.pop(key, None)
        self.log.append(f"delete-service {key}")

    def add_dest(self, key: ServiceKey, rs: RealServer) -> None:
        dests = self.dests_[key]
        if (rs.address, rs.port) in dests:
            raise FileExistsError(rs)
        dests[(rs.address, rs.port)] = DestState(rs.weight, 0, 0)
        self.log.append(f"add-dest {key} {rs.address}:{rs.port}")

    def update_dest(self, key: ServiceKey, rs: RealServer) -> None:
        old = self.dests_[key][(rs.address, rs.port)]
        self.dests_[key][(rs.address, rs.port)] = old._replace(weight=rs.weight)
        self.log.append(f"update-dest {key} {rs.address}:{rs.port} w={rs.weight}")

    def delete_dest(self, key: ServiceKey, dest: DestKey) -> None:
        del self.dests_[key][dest]
        self.log.append(f"delete-dest {key} {dest[0]}:{dest[1]}")

    def set_connections(self, key: ServiceKey, dest: DestKey, active: int, inactive: int) -> None:
        """Pretend ``dest`` holds connections (what IPVS reports)."""
        old = self.dests_[key][dest]
        self.dests_[key][dest] = old._replace(active=active, inactive=inactive)

    def set_names(self) -> set[str]:
        return set(self.sets)

    def create_set(self, name: str, info: IpsetInfo, family: IPFamily) -> None:
        self.sets.setdefault(name, set())
        self.log.append(f"create-set {name}")

    def set_entries(self, name: str, info: IpsetInfo) -> set[str]:
        self.table_reads.append(f"set {name}")
        return set(self.sets[name])

    def add_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None:
        self.sets[name].add(entry)
        self.log.append(f"add-entry {name} {entry}")

    def delete_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None:
        self.sets[name].remove(entry)
        self.log.append(f"delete-entry {name} {entry}")

    def destroy_set(self, name: str) -> None:
        del self.sets[name]
        self.log.append(f"destroy-set {name}")

    def ensure_dummy(self) -> None:
        if not self.dummy:
            self.dummy = True
            self.log.append("add-dummy")

    def delete_dummy(self) -> bool:
        existed, self.dummy = self.dummy, False
        self.bound.clear()
        if existed:
            self.log.append("delete-dummy")
        return existed

    def addresses(self, family: IPFamily) -> set[str]:
        self.table_reads.append(f"addresses {family}")
        return {a for a in self.bound if (":" in a) == (family == "IPv6")}

    def add_address(self, address: str) -> None:
        self.bound.add(address)
        self.log.append(f"add-address {address}")

    def delete_address(self, address: str) -> None:
        self.bound.remove(address)
        self.log.append(f"delete-address {address}")
