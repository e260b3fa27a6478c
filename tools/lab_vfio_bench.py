"""4 KiB random reads on an assigned NVMe virtual function: kvmpy against QEMU's vfio-pci.

    python tools/lab_vfio_bench.py [--rounds N] [--reads N]

In the SR-IOV lab (docs/lab.md) the first virtual function goes to one guest at a time: Debian's
kernel with its stock nvme driver and the default initramfs, which runs ``kvmpy-bench
blk-randread`` (QD1 O_DIRECT 4 KiB reads at random offsets of the namespace) three times per
boot. kvmpy and QEMU/KVM (``-device vfio-pci``) alternate, ``--rounds`` boots each. Both VMMs
only set the function up: its doorbells are mapped into the guest and its interrupts are
irqfds, so this measures the lab's nested path to the device, with the VMMs out of the way
(the row says whether that holds). Prints the Markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from datetime import UTC, datetime

from kvmpy.bench import lab
from kvmpy.bench.metric import Better, Metric, Target
from kvmpy.bench.report import load_average, markdown_table
from kvmpy.lab.image import DEFAULT_MODULES, encode_command
from kvmpy.lab.runner import run_in_lab
from kvmpy.vmm.stats_report import device_exits

SAMPLE = re.compile(r"BENCH blk-randread ops=\d+ seconds=[\d.]+ iops=([\d.]+)")


def guest_command(reads: int) -> str:
    wait = "for i in $(seq 30); do [ -b /dev/nvme0n1 ] && break; sleep 1; done; "
    reads_three_times = f"for r in 1 2 3; do {lab.TOOL} blk-randread /dev/nvme0n1 {reads}; done; "
    return wait + reads_three_times + "poweroff -f"


def lab_command(rounds: int, reads: int) -> str:
    kernel, initrd = lab.bench_initrd(modules=[*DEFAULT_MODULES, "nvme"], name="nvme")
    cmdline = f"console=ttyS0 quiet {encode_command(guest_command(reads))}"
    kvmpy = (
        f"{sys.executable} -m kvmpy run --kernel {kernel} --initrd {initrd} --memory 384M --stats"
        f' --cmdline "{cmdline}" --device vfio=$KVMPY_LAB_VF1'
    )
    qemu = (
        f"qemu-system-x86_64 -accel kvm -M pc -cpu host -m 384 -display none -monitor none"
        f" -serial stdio -no-reboot -kernel {kernel} -initrd {initrd} -append \"{cmdline}\""
        " -device vfio-pci,host=$KVMPY_LAB_VF1"
    )
    lines = ["set -u"]
    for round_number in range(1, rounds + 1):
        lines += [f'echo "==== kvmpy {round_number}"', f"timeout 300 {kvmpy} 2>&1"]
        lines += [f'echo "==== qemu {round_number}"', f"timeout 300 {qemu} 2>&1"]
    return "\n".join(lines) + "\n"


def samples(text: str) -> tuple[list[float], list[float], int]:
    """IOPS per run for kvmpy and QEMU, and the most BAR0 exits one kvmpy boot made."""
    kvmpy: list[float] = []
    qemu: list[float] = []
    exits = 0
    for part in text.split("==== ")[1:]:
        found = [float(value) for value in SAMPLE.findall(part)]
        if part.startswith("kvmpy"):
            kvmpy += found
            exits = max(exits, device_exits(part, "vfio0 BAR0"))
        else:
            qemu += found
    return kvmpy, qemu, exits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="boots of each VMM (three runs per boot)")
    parser.add_argument("--reads", type=int, default=2000, help="4 KiB reads per run")
    args = parser.parse_args()
    before = load_average()
    output = io.BytesIO()
    status = run_in_lab(["sh", "-c", lab_command(args.rounds, args.reads)], output=output, sriov=True)
    text = output.getvalue().decode("utf-8", "replace")
    kvmpy, qemu, exits = samples(text)
    if status != 0 or not kvmpy or not qemu:
        print(text)
        print(f"the lab command ended with status {status}; samples: kvmpy {kvmpy}, QEMU {qemu}")
        return 1
    metric = Metric(
        key="vfio_nvme_vf_randread",
        title="assigned NVMe virtual function, 4 KiB random read QD1 (vfio-pci)",
        unit="IOPS",
        where="lab (SR-IOV, npt=on)",
        better=Better.HIGHER,
        kvmpy=kvmpy,
        qemu=qemu,
        target=Target(ratio=1.0),
        note=f"the most BAR0 exits of one kvmpy boot: {exits} (the MSI-X table page)",
    )
    print(f"load average before: {before}; after: {load_average()}\n")
    print(markdown_table([metric], datetime.now(UTC).strftime("%Y-%m-%d")))
    print(f"\n- {metric.title}: {metric.note}; kvmpy runs {kvmpy}, QEMU runs {qemu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
