"""System metrics of one site: CPU, memory and GPU use, sampled by a background thread.

:class:`SystemMetricsSampler` logs, every ``interval`` seconds, into a site's
:class:`~fl_ray.tracking.writers.MLflowWriter` under MLflow's own system-metric names
(``system/cpu_utilization_percentage``, ``system/gpu_0_utilization_percentage``, ...), with the sample
index as the step. GPU metrics come from NVML (``pynvml``, from the nvidia-ml-py package) for the
GPUs this process may use: those ``CUDA_VISIBLE_DEVICES`` names (Ray sets it for an actor given GPUs;
NVML indices or ``GPU-`` UUIDs, read as CUDA reads them), else all. ``gpu_N`` is the GPU that is
``cuda:N`` in this process; integer entries are taken as NVML (PCI bus) indices, as with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Sites that share a GPU each log that whole GPU's use. Without NVML
or without a visible GPU the sampler logs CPU and memory only, after one warning (or, with
``warn_no_gpu=False``, only saying why in ``no_gpu``, for a job to report once for all its sites).
Steps continue where the site's earlier samples stopped, so a restarted or resumed site adds to its
curves instead of starting them again at 0.
:func:`gpu_description` is the nvidia-smi-like text a site stores once. NVML is reached only through
:class:`_Nvml`, over a pynvml-compatible module that tests may replace with a fake.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from fl_ray.tracking.writers import MLflowWriter

log = logging.getLogger(__name__)

MB = 1e6  # decimal megabytes, as MLflow's system metrics use
JOIN_TIMEOUT = 30.0  # seconds stop() waits for a sample in progress


@dataclass(frozen=True)
class _Gpu:
    """A GPU this process may use: ``cuda:ordinal`` here, NVML ``index`` on the node."""

    ordinal: int
    index: int
    handle: Any


class _Nvml:
    """The few NVML calls this module makes, over ``pynvml`` or a pynvml-compatible fake."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self.error = module.NVMLError

    @classmethod
    def open(cls, module: Any = None) -> tuple[_Nvml | None, str]:
        """Start NVML: ``(nvml, "")``, or ``(None, why not)``."""
        if module is None:
            try:
                import pynvml
            except ImportError:
                return None, "NVML is not available (the nvidia-ml-py package is not installed)"
            module = pynvml
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            return None, f"NVML is not available ({exc})"
        return cls(module), ""

    def close(self) -> None:
        """Release this module's hold on NVML."""
        try:
            self._m.nvmlShutdown()
        except self.error as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def driver(self) -> str:
        """Driver and CUDA versions, e.g. ``driver 550.54.15, CUDA 12.4``."""
        cuda = self._m.nvmlSystemGetCudaDriverVersion()
        return f"driver {_text(self._m.nvmlSystemGetDriverVersion())}, CUDA {cuda // 1000}.{cuda % 1000 // 10}"

    def visible(self, cuda_visible_devices: str | None) -> list[_Gpu]:
        """The GPUs ``CUDA_VISIBLE_DEVICES`` lets this process use, in CUDA's order.

        As CUDA does, the list ends at the first entry that names no GPU (``-1``, an unknown index or UUID).
        """
        count = self._m.nvmlDeviceGetCount()
        handles = [self._m.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        if cuda_visible_devices is None:
            return [_Gpu(i, i, h) for i, h in enumerate(handles)]
        uuids = [self.uuid(h) for h in handles]
        gpus: list[_Gpu] = []
        for entry in (e.strip() for e in cuda_visible_devices.split(",")):
            if entry.lstrip("-").isdigit():
                index = int(entry)
            else:
                matches = [i for i, u in enumerate(uuids) if entry.startswith("GPU-") and u.startswith(entry)]
                index = matches[0] if len(matches) == 1 else -1
            if not 0 <= index < count or any(g.index == index for g in gpus):
                break
            gpus.append(_Gpu(len(gpus), index, handles[index]))
        return gpus

    def name(self, handle: Any) -> str:
        return _text(self._m.nvmlDeviceGetName(handle))

    def uuid(self, handle: Any) -> str:
        return _text(self._m.nvmlDeviceGetUUID(handle))

    def memory(self, handle: Any) -> tuple[int, int]:
        """Used and total memory, in bytes."""
        info = self._m.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def utilization(self, handle: Any) -> float:
        """Percent of the last sample period in which a kernel ran."""
        return float(self._m.nvmlDeviceGetUtilizationRates(handle).gpu)

    def power(self, handle: Any) -> tuple[float, float]:
        """Power draw and enforced power limit, in watts."""
        return (
            self._m.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            self._m.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_description(nvml: Any = None) -> str:
    """An nvidia-smi-like summary of this process's GPUs: host, driver, and per visible GPU its
    ``cuda:N``, NVML index, name, memory and UUID; or a line saying why there is none.

    ``nvml``: a pynvml-compatible module (default: ``pynvml``); tests pass a fake.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines = [
        f"host: {socket.gethostname()}",
        f"CUDA_VISIBLE_DEVICES: {env if env is not None else '(unset: all GPUs visible)'}",
    ]
    opened, why = _Nvml.open(nvml)
    if opened is None:
        return "\n".join(lines + [f"no GPU: {why}"]) + "\n"
    try:
        gpus = opened.visible(env)
        lines.append(f"NVIDIA {opened.driver()}")
        lines += [
            f"cuda:{g.ordinal}  GPU {g.index}  {opened.name(g.handle)}  "
            f"{opened.memory(g.handle)[1] // 2**20} MiB  {opened.uuid(g.handle)}"
            for g in gpus
        ]
        if not gpus:
            lines.append("no GPU: none of the node's GPUs is visible to this process")
    except opened.error as exc:
        lines.append(f"no GPU: NVML failed ({exc})")
    finally:
        opened.close()
    return "\n".join(lines) + "\n"


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class SystemMetricsSampler:
    """Samples CPU, memory and GPU use every ``interval`` seconds into ``writer`` (see the module docstring).

    ``gpu_indices``: which visible GPUs to sample, by ``cuda:N`` ordinal (default: all visible).
    ``nvml``: a pynvml-compatible module (default: ``pynvml``); tests pass a fake.
    ``warn_no_gpu``: log a warning when no GPU is sampled (else only ``no_gpu`` says why).
    Use ``start()`` / ``stop()`` or ``with``; ``stop()`` takes one last sample and is safe to repeat.
    """

    def __init__(
        self,
        writer: MLflowWriter,
        interval: float = 10.0,
        gpu_indices: list[int] | None = None,
        *,
        nvml: Any = None,
        warn_no_gpu: bool = True,
    ) -> None:
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not (math.isfinite(interval) and interval > 0)
        ):
            raise ValueError(f"interval: expected a positive number of seconds, got {interval!r}")
        if gpu_indices is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpu_indices
        ):
            raise ValueError(f"gpu_indices: expected a list of cuda:N ordinals (integers >= 0), got {gpu_indices!r}")
        self.writer = writer
        self.interval = float(interval)
        self._gpu_indices = gpu_indices
        self._nvml_module = nvml
        self._nvml: _Nvml | None = None
        self._gpus: list[_Gpu] = []
        self._process = psutil.Process()
        self._state = _State.NEW
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed = False
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"fl_ray-sysmetrics-{writer.site}", daemon=True)
        self._warn_no_gpu = warn_no_gpu
        self.no_gpu = ""  # why no GPU is sampled, once started ("" when one is)
        self.samples = 0  # the next sample's step: past every step this site's system metrics already have

    @property
    def gpus(self) -> list[int]:
        """The ``cuda:N`` ordinals being sampled (empty before ``start()`` or without NVML)."""
        return [g.ordinal for g in self._gpus]

    def start(self) -> SystemMetricsSampler:
        """Find the GPUs to sample and start the thread; warns once if it samples no GPU."""
        with self._lock:
            if self._state is not _State.NEW:
                raise RuntimeError(
                    f"system metrics sampler for site {self.writer.site!r} is {self._state.value}; "
                    "a sampler starts once (create a new one)"
                )
            self._state = _State.RUNNING
        try:
            why = self._open_gpus()
        except Exception:
            self._state = _State.STOPPED
            raise
        self.no_gpu = why
        if why and self._warn_no_gpu:
            log.warning("site %s: no GPU metrics: %s; sampling CPU and memory only", self.writer.site, why)
        keys = self.sample()  # the first reading of each CPU counter only sets its baseline
        self.samples = max(self.writer.auto_step(key) for key in keys)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and log one last sample; does nothing if not running."""
        with self._lock:
            if self._state is not _State.RUNNING:
                return
            self._state = _State.STOPPED
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT)
        if self._thread.is_alive():
            log.warning(
                "site %s: system metrics thread still busy after %.0f s; no final sample",
                self.writer.site,
                JOIN_TIMEOUT,
            )
        elif not self._failed:
            self._log_sample()
        if self._nvml is not None:
            self._nvml.close()

    def __enter__(self) -> SystemMetricsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_gpus(self) -> str:
        """Set ``self._gpus``; return why no GPU is sampled, or ``""``."""
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._nvml, why = _Nvml.open(self._nvml_module)
        if self._nvml is None:
            return why
        try:
            visible = self._nvml.visible(env)
        except self._nvml.error as exc:
            return f"NVML failed to list GPUs ({exc})"
        if self._gpu_indices is not None:
            missing = sorted(set(self._gpu_indices) - {g.ordinal for g in visible})
            if missing:
                self._nvml.close()
                raise ValueError(
                    f"gpu_indices: {missing} not among the visible GPUs "
                    f"{[g.ordinal for g in visible]} (CUDA_VISIBLE_DEVICES={env!r})"
                )
            visible = [g for g in visible if g.ordinal in self._gpu_indices]
        self._gpus = visible
        if not visible:
            return f"no visible GPU (CUDA_VISIBLE_DEVICES={env!r})"
        return ""

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._log_sample():
                return

    def _log_sample(self) -> bool:
        try:
            self.writer.log_metrics(self.sample(), step=self.samples)
        except Exception:  # a closed or broken writer ends sampling; training goes on
            self._failed = True
            log.exception("site %s: logging system metrics failed; sampling stopped", self.writer.site)
            return False
        self.samples += 1
        return True

    def sample(self) -> dict[str, float]:
        """One reading of every metric, by its logged name."""
        vm = psutil.virtual_memory()
        rss = self._process.memory_info().rss
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_megabytes": vm.used / MB,
            "system/system_memory_usage_percentage": vm.used / vm.total * 100,
            "system/process_cpu_utilization_percentage": self._process.cpu_percent(),
            "system/process_memory_usage_megabytes": rss / MB,
            "system/process_memory_usage_percentage": rss / vm.total * 100,
        }
        for gpu in self._gpus:
            values.update(self._gpu_sample(gpu))
        return values

    def _gpu_sample(self, gpu: _Gpu) -> dict[str, float]:
        """One GPU's metrics; a reading NVML refuses (e.g. power on some boards) is skipped, warned once."""
        nvml, h, p = self._nvml, gpu.handle, f"system/gpu_{gpu.ordinal}_"
        assert nvml is not None  # GPUs are sampled only while NVML is open
        values: dict[str, float] = {}
        try:
            values[p + "utilization_percentage"] = nvml.utilization(h)
        except nvml.error as exc:
            self._warn_once(gpu, "utilization", exc)
        try:
            used, total = nvml.memory(h)
            values.update({p + "memory_usage_megabytes": used / MB, p + "memory_total_megabytes": total / MB})
            if total > 0:
                values[p + "memory_usage_percentage"] = used / total * 100
        except nvml.error as exc:
            self._warn_once(gpu, "memory", exc)
        try:
            watts, limit = nvml.power(h)
            values[p + "power_usage_watts"] = watts
            if limit > 0:
                values[p + "power_usage_percentage"] = watts / limit * 100
        except nvml.error as exc:
            self._warn_once(gpu, "power", exc)
        return values

    def _warn_once(self, gpu: _Gpu, what: str, exc: Exception) -> None:
        key = f"{gpu.ordinal}/{what}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "site %s: NVML gives no %s for gpu_%d (%s); skipping it", self.writer.site, what, gpu.ordinal, exc
            )
