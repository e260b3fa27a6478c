"""Data planes outside Python (issue 15): kvmpy's vhost back ends against QEMU's, and against
kvmpy's own Python back ends.

On this machine: one virtio-blk request's round trip with the ring-3 driver
(guests/virtio_blk.c, polling), served by kvmpy's Python virtio-blk and by
qemu-storage-daemon over vhost-user, paired runs with N requests and with none.

In the lab, Debian's drivers under both VMMs, one lab boot: virtio-blk through
qemu-storage-daemon (vhost-user) against QEMU's own virtio-blk on the same image
and against QEMU with the same daemon; virtio-net through vhost-net against QEMU
with ``vhost=on``; vhost-vsock against QEMU's vhost-vsock-pci, with a host process
streaming through the guest's echo and making round trips.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from kvmpy.bench import lab
from kvmpy.bench.measure import Sample, run
from kvmpy.bench.metric import Better, Metric, Target, per_unit
from kvmpy.errors import HostError
from kvmpy.lab.scenarios import Scenario, ScenarioResult
from kvmpy.testing.guests import guest_path

WHERE = "this machine"
REQUESTS = 2000
SOCKET = "{tmp}/vhost-user-blk.sock"
DAEMON_LOG = "{tmp}/daemon.log"


def _blk_run(image: Path, reads: int, disk_options: str) -> Sample:
    disk = ("--disk", f"{image}{disk_options}")
    sample = run("kvmpy", guest_path("virtio_blk"), f"reads={reads}", 256, disk)
    if sample.status != 0:
        backend = disk_options or "Python"
        raise HostError(f"the virtio_blk guest ended with status {sample.status} ({backend})")
    return sample


def local_metrics(repetitions: int, progress: lab.Progress) -> list[Metric]:
    """The request round trip through each back end, and what vhost-user saves."""
    backends = {"python": "", "vhost-user": ",backend=vhost-user"}
    per_request: dict[str, list[float]] = {name: [] for name in backends}
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as scratch:
        image = Path(scratch) / "disk.img"
        image.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
        for index in range(repetitions):
            for name, options in backends.items():
                loaded, empty = _blk_run(image, REQUESTS, options), _blk_run(image, 0, options)
                per_request[name] += [t * 1e6 for t in per_unit([loaded.wall], [empty.wall], REQUESTS)]
            progress(f"virtio-blk back ends: {index + 1}/{repetitions}")
    note = "ring-3 driver polling its used ring, one 512-byte read in flight; paired runs (N and 0 requests)"
    python = Metric(
        "blk_request_python", "virtio-blk request round trip, kvmpy's Python back end", "µs", WHERE,
        kvmpy=per_request["python"], note=note,
    )  # fmt: skip
    vhost = Metric(
        "blk_request_vhost_user",
        "virtio-blk request round trip, vhost-user (qemu-storage-daemon, kicks and interrupts by eventfd)",
        "µs", WHERE, kvmpy=per_request["vhost-user"], note=note,
    )  # fmt: skip
    saving = Metric(
        "blk_request_vhost_user_ratio",
        "vhost-user's request round trip over the Python back end's (paired, same run)",
        "×", WHERE, kvmpy=[v / p for v, p in zip(vhost.kvmpy, python.kvmpy, strict=True) if p > 0],
        target=Target(absolute=1.0),
    )  # fmt: skip
    return [python, vhost, saving]


# --- the lab -------------------------------------------------------------------------------------
def _daemon_prepare(image: str) -> str:
    """qemu-storage-daemon exporting ``image`` for QEMU's vhost-user-blk-pci (kvmpy starts its own)."""
    return (
        f"dd if=/dev/urandom of={image} bs=1M count={lab.DISK_MIB} 2>/dev/null && "
        f"(qemu-storage-daemon --blockdev driver=file,filename={image},node-name=f0 "
        f"--export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={SOCKET},writable=on "
        f"> {DAEMON_LOG} 2>&1 & echo $! > {{tmp}}/daemon.pid); "
        f"for i in $(seq 100); do [ -S {SOCKET} ] && break; sleep 0.1; done"
    )


def _qemu_vhost_user_args(memory: str) -> tuple[str, ...]:
    """QEMU's vhost-user-blk needs guest RAM as a shared memfd, as kvmpy's does, and one queue
    (it asks for one per vCPU; the daemon's export has one)."""
    return (
        "-object", f"memory-backend-memfd,id=ram,size={memory},share=on", "-machine", "memory-backend=ram",
        "-chardev", f"socket,id=vu,path={SOCKET}", "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1",
    )  # fmt: skip


def lab_scenarios(kernel: str, initrd: str, plan: lab.LabPlan) -> list[Scenario]:
    base = Scenario("", kernel, initrd, "", cpus=2, memory="512M", timeout=300.0, retries=1)
    blk = lab.workload_rounds(
        plan,
        f"{lab.TOOL} blk-write /dev/vda {plan.blk_mib}; {lab.TOOL} blk-read /dev/vda {plan.blk_mib}; "
        f"{lab.TOOL} blk-randread /dev/vda {plan.random_reads}",
    )
    image = "{tmp}/bench.img"
    fill = f"dd if=/dev/urandom of={image} bs=1M count={lab.DISK_MIB} 2>/dev/null"
    net = f"ip link set eth0 up && ip addr add {lab.GUEST_ADDRESS}/24 dev eth0 && " + lab.workload_rounds(
        plan,
        f"{lab.TOOL} tcp-send {lab.HOST_ADDRESS} 5001 {plan.net_mib}; "
        f"{lab.TOOL} tcp-recv {lab.HOST_ADDRESS} 5002 {plan.net_mib}; "
        f"{lab.TOOL} tcp-rr {lab.HOST_ADDRESS} 5003 {plan.round_trips}",
    )
    qemu_net = (
        "-netdev", f"tap,id=net0,ifname={lab.TAP},script=no,downscript=no,vhost=on",
        "-device", f"virtio-net-pci,netdev=net0,mac={lab.MAC}",
    )  # fmt: skip
    net_base = replace(base, command=net, prepare=lab.net_prepare(), verify=lab.net_cleanup())
    vsock = replace(base, command=f"{lab.TOOL} vsock-echo {VSOCK_PORT} 2; poweroff -f")
    return [
        replace(base, name="vhost-blk-kvmpy", command=blk, prepare=fill,
                args=("--disk", f"{image},backend=vhost-user")),
        replace(base, name="vhost-blk-qemu", vmm="qemu", command=blk, prepare=fill,
                args=("-drive", f"file={image},if=virtio,format=raw,cache=writeback,aio=threads")),
        replace(base, name="vhost-blk-daemon-qemu", vmm="qemu", command=blk, prepare=_daemon_prepare(image),
                args=_qemu_vhost_user_args(base.memory), verify="kill $(cat {tmp}/daemon.pid)"),
        replace(net_base, name="vhost-net-kvmpy", args=("--net", f"tap={lab.TAP},mac={lab.MAC},vhost=on")),
        replace(net_base, name="vhost-net-qemu", vmm="qemu", args=qemu_net),
        replace(vsock, name="vhost-vsock-kvmpy", args=("--vsock", f"cid={VSOCK_CIDS[0]}"),
                prepare=_vsock_peer(VSOCK_CIDS[0]), verify=VSOCK_VERIFY),
        replace(vsock, name="vhost-vsock-qemu", vmm="qemu",
                args=("-device", f"vhost-vsock-pci,guest-cid={VSOCK_CIDS[1]}"),
                prepare=_vsock_peer(VSOCK_CIDS[1]), verify=VSOCK_VERIFY),
        *mq_scenarios(base, plan),
        *fs_scenarios(base, plan),
    ]  # fmt: skip


#: Queue-pair scaling: two TCP sends at once, one pinned to each of the guest's two vCPUs, on one
#: queue pair and on two (the guest's XPS sends from vCPU N on queue N).
MQ_PAIRS = (1, 2)


def _parallel_sends(plan: lab.LabPlan) -> str:
    send = f"{lab.TOOL} tcp-send {lab.HOST_ADDRESS} 5001 {plan.net_mib}"
    sends = f"for cpu in 0 1; do taskset -c $cpu {send} > /tmp/send$cpu & done; wait"
    return lab.workload_rounds(plan, f"{sends}; cat /tmp/send0 /tmp/send1")


def mq_scenarios(base: Scenario, plan: lab.LabPlan) -> list[Scenario]:
    """kvmpy (vhost-net and its Python back end) and QEMU (vhost=on) with one and two pairs."""
    address = f"ip link set eth0 up && ip addr add {lab.GUEST_ADDRESS}/24 dev eth0 && "
    command = address + _parallel_sends(plan)
    scenarios = []
    for pairs in MQ_PAIRS:
        prepare = lab.net_prepare(multi_queue=pairs > 1)
        net = replace(base, command=command, prepare=prepare, verify=lab.net_cleanup())
        for backend in ("vhost", "python"):
            vhost = "on" if backend == "vhost" else "off"
            option = f"tap={lab.TAP},mac={lab.MAC},vhost={vhost},queues={pairs}"
            scenarios.append(replace(net, name=f"mq-{backend}-kvmpy-{pairs}", args=("--net", option)))
        queues, mq = (f",queues={pairs}", f",mq=on,vectors={2 * pairs + 2}") if pairs > 1 else ("", "")
        qemu = (
            "-netdev", f"tap,id=net0,ifname={lab.TAP},script=no,downscript=no,vhost=on{queues}",
            "-device", f"virtio-net-pci,netdev=net0,mac={lab.MAC}{mq}",
        )  # fmt: skip
        scenarios.append(replace(net, name=f"mq-vhost-qemu-{pairs}", vmm="qemu", args=qemu))
    return scenarios


def _aggregate_mbitps(result: ScenarioResult | None) -> list[float]:
    """Per round, the two parallel sends' rates added up (a round whose two lines are not both
    there is left out)."""
    if result is None:
        return []
    rates = [line["mbitps"] for line in lab.bench_lines(result).get("tcp-send", []) if "mbitps" in line]
    return [rates[i] + rates[i + 1] for i in range(0, len(rates) - 1, 2)]


def mq_metrics(results: dict[str, ScenarioResult]) -> list[Metric]:
    def rates(name: str) -> list[float]:
        return _aggregate_mbitps(results.get(name))

    def scaling(name: str) -> list[float]:
        one, two = rates(f"{name}-1"), rates(f"{name}-2")
        return [b / a for a, b in zip(one, two, strict=False) if a > 0]

    title = "two TCP sends at once (one per vCPU) over two queue pairs, guest → host"
    two_pairs = Metric(
        "vhost_net_mq_send_2_pairs", f"vhost-net {title}, against QEMU with vhost=on,queues=2", "Mbit/s",
        lab.WHERE, better=Better.HIGHER, kvmpy=rates("mq-vhost-kvmpy-2"), qemu=rates("mq-vhost-qemu-2"),
        target=Target(ratio=1.0),
    )  # fmt: skip
    vhost_scaling = Metric(
        "vhost_net_mq_scaling", "vhost-net: two pairs' aggregate over one pair's, the same two sends", "×",
        lab.WHERE, better=Better.HIGHER, kvmpy=scaling("mq-vhost-kvmpy"), qemu=scaling("mq-vhost-qemu"),
        note="paired by round: each round's two-pair rate over the same round's one-pair rate",
    )  # fmt: skip
    python_scaling = Metric(
        "python_net_mq_scaling", "kvmpy's Python back end: two pairs' aggregate over one pair's", "×",
        lab.WHERE, better=Better.HIGHER, kvmpy=scaling("mq-python-kvmpy"),
        note="the two pairs share one event loop thread (and the GIL)",
    )  # fmt: skip
    for metric in (two_pairs, vhost_scaling, python_scaling):
        for name in results:
            if name.startswith("mq-") and not lab.bench_lines(results[name]).get("tcp-send"):
                metric.note = (metric.note + "; " if metric.note else "") + f"{name} gave no samples"
    return [two_pairs, vhost_scaling, python_scaling]


#: virtio-fs: the same virtiofsd options under both VMMs (kvmpy's own, kvmpy.virtio.vhost.virtiofsd).
FS_SHARE, FS_SOCKET, FS_MIB, FS_FILES = "{tmp}/share", "{tmp}/virtiofs.sock", 32, 500


def fs_scenarios(base: Scenario, plan: lab.LabPlan) -> list[Scenario]:
    """A file written and read back, and small files created, stat'ed and removed, on a lab
    directory shared through virtiofsd: kvmpy's --fs against QEMU's vhost-user-fs-pci."""
    from kvmpy.virtio.vhost.virtiofsd import virtiofsd_arguments

    tool = lab.TOOL
    work = (
        f"{tool} fs-write /mnt/big {FS_MIB}; echo 3 > /proc/sys/vm/drop_caches; "
        f"{tool} fs-read /mnt/big {FS_MIB}; mkdir -p /mnt/meta; {tool} fs-meta /mnt/meta {FS_FILES}"
    )
    command = "mount -t virtiofs share /mnt && " + lab.workload_rounds(plan, work)
    daemon = " ".join(virtiofsd_arguments(Path(FS_SHARE), Path(FS_SOCKET)))
    qemu_prepare = (
        f"mkdir -p {FS_SHARE} && ({daemon} > {{tmp}}/virtiofsd.log 2>&1 & echo $! > {{tmp}}/virtiofsd.pid); "
        f"for i in $(seq 100); do [ -S {FS_SOCKET} ] && break; sleep 0.1; done"
    )
    qemu = (
        "-object", f"memory-backend-memfd,id=ram,size={base.memory},share=on",
        "-machine", "memory-backend=ram", "-chardev", f"socket,id=fs,path={FS_SOCKET}",
        "-device", "vhost-user-fs-pci,chardev=fs,tag=share",
    )  # fmt: skip
    return [
        replace(base, name="virtiofs-kvmpy", command=command, prepare=f"mkdir -p {FS_SHARE}",
                args=("--fs", f"tag=share,path={FS_SHARE}")),
        replace(base, name="virtiofs-qemu", vmm="qemu", command=command, prepare=qemu_prepare, args=qemu,
                verify="kill $(cat {tmp}/virtiofsd.pid)"),
    ]  # fmt: skip


def fs_metrics(results: dict[str, ScenarioResult]) -> list[Metric]:
    metrics = []
    for line, key, what, unit in (
        ("fs-write", "mbps", f"a {FS_MIB} MiB file written (1 MiB writes, fsync)", "MB/s"),
        ("fs-read", "mbps", f"the {FS_MIB} MiB file read back (guest cache dropped)", "MB/s"),
        ("fs-meta", "opsps", f"{FS_FILES} small files created, stat'ed and removed", "ops/s"),
    ):
        metric = Metric(
            f"virtiofs_{line.replace('-', '_')}", f"virtio-fs (virtiofsd, cache=auto) {what}, against QEMU",
            unit, lab.WHERE, better=Better.HIGHER, target=Target(ratio=1.0),
        )  # fmt: skip
        for vmm in lab.VMMS:
            lab.add_bench_value(metric, vmm, results, f"virtiofs-{vmm}", line, key)
        metrics.append(metric)
    return metrics


#: Each VMM's guest gets a CID of its own (a CID stays taken until its VMM has gone).
VSOCK_CIDS, VSOCK_PORT, VSOCK_MIB, VSOCK_ROUND_TRIPS = (44, 45), 5000, 16, 500
VSOCK_VERIFY = "sleep 1; cat {tmp}/vsock.txt"


def _vsock_peer(cid: int) -> str:
    """The host side in the lab: kvmpy.lab.vsock_peer, started before the VM (it waits)."""
    peer = f"{sys.executable} -m kvmpy.lab.vsock_peer {cid} {VSOCK_PORT} {VSOCK_MIB} {VSOCK_ROUND_TRIPS}"
    return f"({peer} > {{tmp}}/vsock.txt 2>&1 &)"


def _with_peer_lines(result: ScenarioResult) -> ScenarioResult:
    """The vsock figures are the host peer's (in the notes, from the verify step)."""
    return replace(result, output=result.output + "\n" + "\n".join(result.notes))


def _blk_metrics(results: dict[str, ScenarioResult], peer: str, against: str) -> list[Metric]:
    rows = (
        ("blk-read", "mbps", "sequential read 1 MiB", "MB/s"),
        ("blk-write", "mbps", "sequential write 1 MiB", "MB/s"),
        ("blk-randread", "iops", "4 KiB random read QD1", "IOPS"),
    )
    metrics = []
    for line, key, what, unit in rows:
        metric = Metric(
            f"vhost_user_{line.replace('-', '_')}_vs_{peer.replace('-', '_')}",
            f"vhost-user-blk (qemu-storage-daemon) {what}, against {against}",
            unit, lab.WHERE, better=Better.HIGHER, target=Target(ratio=1.0),
        )  # fmt: skip
        lab.add_bench_value(metric, "kvmpy", results, "vhost-blk-kvmpy", line, key)
        lab.add_bench_value(metric, "qemu", results, peer, line, key)
        metrics.append(metric)
    return metrics


def lab_metrics(results: dict[str, ScenarioResult]) -> list[Metric]:
    metrics = _blk_metrics(results, "vhost-blk-qemu", "QEMU's own virtio-blk (cache=writeback)")
    same_daemon = "QEMU with the same daemon (vhost-user-blk-pci)"
    metrics += _blk_metrics(results, "vhost-blk-daemon-qemu", same_daemon)
    for line, key, title, unit, better in (
        ("tcp-send", "mbitps", "TCP guest → host", "Mbit/s", Better.HIGHER),
        ("tcp-recv", "mbitps", "TCP host → guest", "Mbit/s", Better.HIGHER),
        ("tcp-rr", "rtt_us", "TCP 1-byte round trip", "µs", Better.LOWER),
    ):
        metric = Metric(
            f"vhost_net_{line.replace('-', '_')}", f"vhost-net {title}, against QEMU with vhost=on", unit,
            lab.WHERE, better=better, target=Target(ratio=1.0),
        )  # fmt: skip
        for vmm in lab.VMMS:
            lab.add_bench_value(metric, vmm, results, f"vhost-net-{vmm}", line, key)
        metrics.append(metric)
    peers = {name: _with_peer_lines(r) for name, r in results.items() if name.startswith("vhost-vsock-")}
    for line, key, title, unit, better in (
        ("vsock-stream", "mbitps", f"{VSOCK_MIB} MiB out and back at once", "Mbit/s", Better.HIGHER),
        ("vsock-rr", "rtt_us", "1-byte round trip", "µs", Better.LOWER),
    ):
        metric = Metric(
            f"vhost_{line.replace('-', '_')}", f"vhost-vsock {title}, host process ↔ guest, against QEMU",
            unit, lab.WHERE, better=better, target=Target(ratio=1.0),
        )  # fmt: skip
        for vmm in lab.VMMS:
            lab.add_bench_value(metric, vmm, peers, f"vhost-vsock-{vmm}", line, key)
        metrics.append(metric)
    return metrics + mq_metrics(results) + fs_metrics(results)


def run_vhost_suite(repetitions: int, progress: lab.Progress, *, with_lab: bool) -> list[Metric]:
    metrics = local_metrics(repetitions, progress)
    if with_lab:
        kernel, initrd = lab.bench_initrd()
        scenarios = lab_scenarios(str(kernel), str(initrd), lab.LabPlan.full())
        results = lab.run_lab_batch(scenarios, npt=True, progress=progress, batch="vhost")
        metrics += lab_metrics(results)
    return metrics


__all__ = ["lab_metrics", "lab_scenarios", "local_metrics", "run_vhost_suite"]
