"""Results become Firecracker's JSON: instance info, machine config, the full VM config.

The full config has the layout ``--config-file`` takes (Firecracker's ``VmmConfig``):
every key Firecracker writes is present, null or empty for what kvmpy does not
have, so Firecracker's clients find what they expect and the output loads back
through :func:`kvmpy.api.config_file.load_config_file`. kvmpy's extras are
``drives[].direct``, a ``serial`` object and the ``vfio`` list (docs/api.md).
"""

from __future__ import annotations

from kvmpy.vmm.actions import InstanceInfo
from kvmpy.vmm.config import (
    BalloonConfig,
    DiskConfig,
    LoggerConfig,
    MetricsConfig,
    NetConfig,
    RateLimiterConfig,
    SerialMode,
    TokenBucketConfig,
    VfioConfig,
    VmConfig,
)

Json = dict[str, object]


def instance_info(info: InstanceInfo) -> Json:
    return {
        "id": info.id,
        "state": info.state.value,
        "vmm_version": info.vmm_version,
        "app_name": info.app_name,
    }


def version(info: InstanceInfo) -> Json:
    """GET /version: Firecracker's key, kvmpy's version."""
    return {"firecracker_version": info.vmm_version}


def _bucket(bucket: TokenBucketConfig | None) -> Json | None:
    if bucket is None:
        return None
    return {
        "size": bucket.size,
        "one_time_burst": bucket.one_time_burst or None,
        "refill_time": bucket.refill_time_ms,
    }


def rate_limiter(limiter: RateLimiterConfig | None) -> Json | None:
    if limiter is None or (limiter.bandwidth is None and limiter.ops is None):
        return None
    return {"bandwidth": _bucket(limiter.bandwidth), "ops": _bucket(limiter.ops)}


def machine_config(config: VmConfig) -> Json:
    return {
        "vcpu_count": config.cpus,
        "mem_size_mib": config.memory >> 20,
        "smt": config.smt,
        "track_dirty_pages": config.track_dirty_pages,
        "huge_pages": "2M" if config.hugepages else "None",
    }


def boot_source(config: VmConfig) -> Json | None:
    """Null until a kernel is configured (Firecracker writes an empty path; null loads back)."""
    if config.kernel is None:
        return None
    return {
        "kernel_image_path": str(config.kernel),
        "initrd_path": str(config.initrd) if config.initrd is not None else None,
        "boot_args": config.cmdline or None,
    }


def drive(disk: DiskConfig) -> Json:
    return {
        "drive_id": disk.id,
        "partuuid": disk.partuuid or None,
        "is_root_device": disk.is_root_device,
        "cache_type": disk.cache_type,
        "is_read_only": disk.read_only,
        "path_on_host": str(disk.path),
        "rate_limiter": rate_limiter(disk.rate_limiter),
        "io_engine": "Sync",
        "socket": None,
        "direct": disk.direct,
    }


def network_interface(net: NetConfig) -> Json:
    return {
        "iface_id": net.id,
        "host_dev_name": net.tap,
        "guest_mac": net.mac or None,
        "mtu": None,
        "rx_rate_limiter": rate_limiter(net.rx_rate_limiter),
        "tx_rate_limiter": rate_limiter(net.tx_rate_limiter),
    }


def vfio_device(device: VfioConfig) -> Json:
    """A PUT /vfio/{id} body: the address is the canonical one, whatever form was given."""
    return {"vfio_id": device.id, "host_bdf": device.bdf}


def _logger(logger: LoggerConfig | None) -> Json | None:
    if logger is None:
        return None
    return {
        "log_path": str(logger.path) if logger.path is not None else None,
        "level": logger.level,
        "show_level": logger.show_level,
        "show_log_origin": logger.show_log_origin,
        "module": logger.module or None,
    }


def _metrics(metrics: MetricsConfig | None) -> Json | None:
    if metrics is None:
        return None
    return {"metrics_path": str(metrics.path), "emit_id": False}


def _serial(config: VmConfig) -> Json:
    """kvmpy's extra key: the file the 16550A writes to (null: standard output) and the console."""
    path = config.serial.path if config.serial.mode is SerialMode.FILE else None
    return {"serial_out_path": str(path) if path is not None else None, "console": config.console}


def balloon(config: BalloonConfig) -> Json:
    """GET /balloon: the balloon as configured, its target as last set."""
    return {
        "amount_mib": config.amount_mib,
        "deflate_on_oom": config.deflate_on_oom,
        "stats_polling_interval_s": config.stats_polling_interval_s,
        "free_page_reporting": config.free_page_reporting,
    }


def full_config(config: VmConfig) -> Json:
    """GET /vm/config: ``config`` in Firecracker's full-config layout."""
    return {
        "balloon": balloon(config.balloon) if config.balloon is not None else None,
        "drives": [drive(disk) for disk in config.disks],
        "boot-source": boot_source(config),
        "cpu-config": None,
        "logger": _logger(config.logger),
        "machine-config": machine_config(config),
        "metrics": _metrics(config.metrics),
        "mmds-config": None,
        "network-interfaces": [network_interface(net) for net in config.nets],
        "vfio": [vfio_device(device) for device in config.vfio_devices],
        "vsock": None,
        "entropy": {"rate_limiter": rate_limiter(config.rng_rate_limiter)} if config.rng else None,
        "pmem": [],
        "memory-hotplug": None,
        "serial": _serial(config),
    }


__all__ = [
    "balloon",
    "full_config",
    "instance_info",
    "machine_config",
    "rate_limiter",
    "version",
    "vfio_device",
]
