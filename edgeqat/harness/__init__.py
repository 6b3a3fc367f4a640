"""On-device validation: a standalone runner and the transports that carry it.

* ``runner.py``: one file copied to the device; numpy plus ai_edge_litert, tflite_runtime
  or tensorflow. ``--probe`` checks runtime and delegate without a model.
* ``transports.py``: local, ``qemu`` (emulated Pi 4), ``ssh`` (system OpenSSH client),
  ``adb``; the same put/get/run/close verbs.
* ``device.py``: ``run_on_device(device, {name: path}, x, y)`` with pre-flight, retries
  and back-off, partial results on failure.
* ``qemu.py``: ``python -m edgeqat.harness.qemu setup`` builds the cached aarch64 sysroot.
* ``compare.py``: ``compare_outputs(host, device)`` in quantization steps, top-1 agreement.

The Edge TPU compatibility report lives in ``edgeqat.edgetpu``.
"""
