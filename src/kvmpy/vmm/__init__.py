"""The VMM: the builder, the threads that run a machine, and the Vmm above it.

Threads of a running kvmpy, and what they share:

- the main thread runs :class:`kvmpy.vmm.vmm.Vmm`: every action (from the API,
  the command line, a signal) is executed there in order, through one queue;
- one thread per vCPU (``vcpu_thread.py``) runs KVM_RUN and the device code of
  its exits; other threads reach a vCPU only through ``kick()`` (pause, and
  ``Machine.on_vcpu`` for state queries);
- the device event loop (``event_loop.py``) runs queue notifications and back
  ends; a pause quiesces it;
- the API server's threads only parse requests and submit actions;
- the console's input pump and output writer move bytes to and from the host.

Lock order (the only order locks are ever taken in; innermost last):

0. the machine's pause condition and stop lock are never held while a device is
   called; the coalesced-ring lock, held while a vCPU thread replays the writes
   KVM buffered, comes before every device lock;
1. a device's lock: a virtio device's ``DeviceGuard.lock`` shared by its transport
   and model (``kvmpy/virtio/guard.py`` has the details), or a legacy device's own
   (the 16550A's, the i8042's); never two device locks at once;
2. taken while holding a device lock, never the other way round: the MSI-X table
   lock and the MSI router's inside it, the PCI INTx lock, the event loop's
   registration lock, the console output's buffer lock, an interrupt line's lock;
3. none of those calls back into a device; the event loop holds no lock while it
   runs a handler; bus lookups take no lock (their tables are immutable and swapped
   whole); the metrics registry only reads counters.
"""
