"""--config-file: Firecracker's layout becomes the API's actions, with one-line errors, and
GET /vm/config's output loads back into the same actions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmpy.api.config_file import load_config_file
from kvmpy.api.messages import Request
from kvmpy.api.router import Router
from kvmpy.errors import ConfigError
from kvmpy.testing.fake_vmm import FakeVmm
from kvmpy.vmm import actions as a
from kvmpy.vmm.config import DiskConfig, MetricsConfig, NetConfig, VfioConfig

FIRECRACKER_EXAMPLE = {
    "boot-source": {"kernel_image_path": "/k/vmlinux.bin", "boot_args": "console=ttyS0 reboot=k panic=1"},
    "drives": [
        {
            "drive_id": "rootfs",
            "path_on_host": "/k/rootfs.ext4",
            "is_root_device": True,
            "is_read_only": False,
        }
    ],
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False},
    "network-interfaces": [{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0"}],
    "metrics": {"metrics_path": "/tmp/metrics.fifo"},
}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "vm.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def test_firecrackers_example_becomes_actions_in_order(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, FIRECRACKER_EXAMPLE)) == [
        a.ConfigureMetrics(MetricsConfig(Path("/tmp/metrics.fifo"))),
        a.ConfigureMachine(2, 1024, smt=False, track_dirty_pages=False, hugepages=False),
        a.ConfigureBootSource(Path("/k/vmlinux.bin"), None, "console=ttyS0 reboot=k panic=1"),
        a.InsertBlockDevice(
            DiskConfig(Path("/k/rootfs.ext4"), id="rootfs", is_root_device=True, cache_type="Unsafe")
        ),
        a.InsertNetworkDevice(NetConfig("tap0", "aa:fc:00:00:00:01", "eth0")),
    ]


def test_kvmpy_extras_serial_and_direct(tmp_path: Path) -> None:
    config = {
        "boot-source": {"kernel_image_path": "/k"},
        "drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": False, "direct": True}],
        "serial": {"serial_out_path": "/tmp/console.log", "console": "virtio"},
    }
    found = load_config_file(write(tmp_path, config))
    assert found[1] == a.InsertBlockDevice(DiskConfig(Path("/d"), id="d", direct=True, cache_type="Unsafe"))
    assert found[2] == a.ConfigureSerial(Path("/tmp/console.log"), "virtio")


def test_get_vm_config_loads_back_into_the_same_configuration(tmp_path: Path) -> None:
    """PUT the example through the API, GET /vm/config, load that as a file, apply it anew."""
    first = FakeVmm()
    for action in load_config_file(write(tmp_path, FIRECRACKER_EXAMPLE)) + [a.SetEntropyDevice()]:
        first.submit(action)
    rendered = Router(first.submit).handle(Request("GET", "/vm/config")).body
    second = FakeVmm()
    for action in load_config_file(write(tmp_path, rendered.decode())):
        second.submit(action)
    assert second.config == first.config


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            '{"boot-source": {"kernel_image_path": "/k"},\n  "drives": [\n    {"drive_id": }\n  ]}',
            "JSON is malformed: invalid character (line 3, column 18)",
        ),
        ({"boot-source": {"kernel_image_path": "/k", "boot_arg": "x"}}, "unknown field `boot_arg`"),
        ({"boot-sauce": {}}, "unknown field `boot-sauce`"),
        (
            {"machine-config": {"vcpu_count": 1}},
            "missing required field `mem_size_mib` - at `$.machine-config`",
        ),
        (
            {"drives": [{"drive_id": "a", "is_root_device": "yes"}]},
            "Expected `bool`, got `str` - at `$.drives[0].is_root_device`",
        ),
        (
            {
                "drives": [
                    {"drive_id": "a", "is_root_device": False, "path_on_host": "/a", "io_engine": "Async"}
                ]
            },
            'drives[0]: The requested operation is not supported: io_engine "Async"',
        ),
        (
            {"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "guest_mac": "zz"}]},
            "network-interfaces[0]: ",
        ),
        (
            {"vsock": {"guest_cid": 3, "uds_path": "/v"}},
            "vsock: The requested operation is not supported: vsock",
        ),
        (
            {"mmds-config": {"network_interfaces": ["eth0"]}},
            "mmds-config: The requested operation is not supported",
        ),
        ({"balloon": {"amount_mib": 1}}, "missing required field `deflate_on_oom`"),
        ("[1, 2]", "Expected `object`, got `array`"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_problem(tmp_path: Path, content: object, words: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert message.startswith(f"config file {path}: "), message
    assert words in message, message
    assert "\n" not in message


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"config file .*nothing.json cannot be read: No such file or directory"
    ):
        load_config_file(tmp_path / "nothing.json")


def test_nulls_and_empty_lists_for_what_kvmpy_lacks_are_accepted(tmp_path: Path) -> None:
    config = {
        "boot-source": {"kernel_image_path": "/k"},
        "balloon": None,
        "vsock": None,
        "pmem": [],
        "cpu-config": None,
        "mmds-config": None,
        "memory-hotplug": None,
        "drives": [],
    }
    assert load_config_file(write(tmp_path, config)) == [a.ConfigureBootSource(Path("/k"))]


def test_a_balloon_in_the_file_is_configured(tmp_path: Path) -> None:
    from kvmpy.vmm.config import BalloonConfig

    balloon = {"amount_mib": 8, "deflate_on_oom": True}
    config = {"boot-source": {"kernel_image_path": "/k"}, "balloon": balloon}
    expected = a.SetBalloon(BalloonConfig(8, deflate_on_oom=True))
    assert load_config_file(write(tmp_path, config))[-1] == expected


def test_vfio_devices_in_the_file_come_after_the_interfaces(tmp_path: Path) -> None:
    config = {
        **FIRECRACKER_EXAMPLE,
        "vfio": [{"vfio_id": "gpu", "host_bdf": "01:00.0"}, {"vfio_id": "nic", "host_bdf": "0000:02:00.1"}],
    }
    found = load_config_file(write(tmp_path, config))
    assert found[-2:] == [
        a.InsertVfioDevice(VfioConfig("0000:01:00.0", id="gpu")),
        a.InsertVfioDevice(VfioConfig("0000:02:00.1", id="nic")),
    ]
    assert isinstance(found[-3], a.InsertNetworkDevice)


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ({"vfio_id": "gpu", "host_bdf": "01:00"}, "vfio[0]: An error occurred when deserializing"),
        ({"vfio_id": "gpu", "host_bdf": "01:00"}, "host_bdf='01:00': not a PCI address"),
        ({"vfio_id": "g-1", "host_bdf": "01:00.0"}, "vfio[0]: API Resource IDs can only contain"),
        ({"vfio_id": "", "host_bdf": "01:00.0"}, "vfio[0]: The ID cannot be empty."),
        ({"vfio_id": "gpu", "host_bdf": "01:00.0", "rom": True}, "unknown field `rom` - at `$.vfio[0]`"),
        ({"host_bdf": "01:00.0"}, "missing required field `vfio_id` - at `$.vfio[0]`"),
    ],
)
def test_a_bad_vfio_device_in_the_file_is_one_line(tmp_path: Path, device: dict, words: str) -> None:
    path = write(tmp_path, {"vfio": [device]})
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert message.startswith(f"config file {path}: ") and words in message, message
    assert "\n" not in message


def test_get_vm_config_with_vfio_devices_loads_back(tmp_path: Path) -> None:
    first = FakeVmm()
    config = {**FIRECRACKER_EXAMPLE, "vfio": [{"vfio_id": "gpu", "host_bdf": "01:00.0"}]}
    for action in load_config_file(write(tmp_path, config)):
        first.submit(action)
    rendered = Router(first.submit).handle(Request("GET", "/vm/config")).body
    assert json.loads(rendered)["vfio"] == [{"vfio_id": "gpu", "host_bdf": "0000:01:00.0"}]
    second = FakeVmm()
    for action in load_config_file(write(tmp_path, rendered.decode())):
        second.submit(action)
    assert second.config == first.config
