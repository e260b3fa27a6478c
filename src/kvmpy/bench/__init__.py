"""Benchmarks: kvmpy against QEMU/KVM on identical guests, measured in the same run."""
