"""SystemMetricsSampler and gpu_description: real CPU/memory sampling, GPU sampling through a fake NVML
module, and (only where NVML finds a GPU) real GPU readings.

Samples go through a real MLflowWriter; its sender is ``RecordingSender``, an in-memory stand-in with
EventSender's ``site`` / ``record`` / ``next_step``, so no Ray is needed.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from fl_ray.system_metrics import SystemMetricsSampler, _Nvml, gpu_description
from fl_ray.tracking.writers import MLflowWriter
from recording_sender import RecordingSender

CPU_KEYS = {
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
    "system/process_cpu_utilization_percentage",
    "system/process_memory_usage_megabytes",
    "system/process_memory_usage_percentage",
}
GPU0_KEYS = {
    f"system/gpu_0_{k}"
    for k in (
        "utilization_percentage",
        "memory_usage_megabytes",
        "memory_total_megabytes",
        "memory_usage_percentage",
        "power_usage_watts",
        "power_usage_percentage",
    )
}
NO_GPU_WARNING = "sampling CPU and memory only"


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakePynvml:
    """A FAKE pynvml module for tests on machines without a GPU: two made-up GPUs with fixed readings.

    ``power_unsupported`` lists NVML indices whose power reading raises, as on boards without a sensor.
    """

    NVMLError = FakeNVMLError

    def __init__(self, power_unsupported: tuple[int, ...] = (), init_error: str | None = None) -> None:
        self.gpus = [
            SimpleNamespace(
                name="Fake GPU A",
                uuid="GPU-aaaa1111-0000-0000-0000-000000000000",
                used=1_000_000_000,
                total=80_000_000_000,
                util=25,
                power_mw=100_000,
                limit_mw=400_000,
            ),
            SimpleNamespace(
                name=b"Fake GPU B",
                uuid="GPU-bbbb2222-0000-0000-0000-000000000000",
                used=2_000_000_000,
                total=40_000_000_000,
                util=75,
                power_mw=300_000,
                limit_mw=600_000,
            ),
        ]
        self.power_unsupported = power_unsupported
        self.init_error = init_error
        self.open_handles = 0

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.open_handles += 1

    def nvmlShutdown(self):
        self.open_handles -= 1

    def nvmlSystemGetDriverVersion(self):
        return b"999.01.02"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h].uuid

    def nvmlDeviceGetName(self, h):
        return self.gpus[h].name

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self.gpus[h]
        return SimpleNamespace(used=g.used, total=g.total, free=g.total - g.used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.gpus[h].util, memory=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if h in self.power_unsupported:
            raise FakeNVMLError("Not Supported")
        return self.gpus[h].power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self.gpus[h].limit_mw


def _real_nvml_gpus() -> int:
    """How many GPUs the real NVML sees here (0 without nvidia-ml-py, driver or GPU)."""
    nvml, _ = _Nvml.open()
    if nvml is None:
        return 0
    try:
        return len(nvml.visible(None))
    finally:
        nvml.close()


HAS_REAL_GPU = _real_nvml_gpus() > 0


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "fl_ray.system_metrics" and r.levelno == logging.WARNING
    ]


def _consecutive_steps(points: list[tuple[int, float]]) -> bool:
    return [s for s, _ in points] == list(range(len(points)))


@pytest.mark.skipif(HAS_REAL_GPU, reason="NVML sees a GPU here; the GPU tests cover this machine")
def test_cpu_only_sampler_logs_cpu_and_memory_with_increasing_steps_and_one_warning(caplog):
    """Without NVML: CPU/memory metrics at steps 0, 1, 2, ... (the last from stop()), no GPU key, one warning."""
    caplog.set_level(logging.WARNING, logger="fl_ray.system_metrics")
    sender = RecordingSender()
    sampler = SystemMetricsSampler(MLflowWriter(sender), interval=0.05)
    sampler.start()
    time.sleep(0.4)
    sampler.stop()

    metrics = sender.metrics()
    assert set(metrics) == CPU_KEYS
    assert sampler.gpus == []
    n = sampler.samples
    assert n >= 3
    for key, points in metrics.items():
        assert len(points) == n and _consecutive_steps(points), key
    assert all(0.0 <= v <= 100.0 for _, v in metrics["system/cpu_utilization_percentage"])
    assert all(v > 0 for _, v in metrics["system/system_memory_usage_megabytes"])
    assert all(0 < v < 100 for _, v in metrics["system/process_memory_usage_percentage"])
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and NO_GPU_WARNING in warnings[0] and "site-1" in warnings[0]


def test_fake_nvml_samples_only_the_gpus_cuda_visible_devices_names(monkeypatch):
    """With CUDA_VISIBLE_DEVICES=1, the fake's second GPU is logged as gpu_0 (cuda:0 of this process)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    fake = FakePynvml()
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=0.05, nvml=fake) as sampler:
        time.sleep(0.25)
        assert sampler.gpus == [0]

    metrics = sender.metrics()
    assert set(metrics) == CPU_KEYS | GPU0_KEYS
    last = {k: v[-1][1] for k, v in metrics.items()}
    assert last["system/gpu_0_utilization_percentage"] == 75.0
    assert last["system/gpu_0_memory_usage_megabytes"] == 2000.0
    assert last["system/gpu_0_memory_total_megabytes"] == 40000.0
    assert last["system/gpu_0_memory_usage_percentage"] == 5.0
    assert last["system/gpu_0_power_usage_watts"] == 300.0
    assert last["system/gpu_0_power_usage_percentage"] == 50.0
    assert all(_consecutive_steps(points) for points in metrics.values())
    assert fake.open_handles == 0  # stop() released NVML


def test_fake_nvml_without_cuda_visible_devices_samples_every_gpu(monkeypatch):
    """Unset CUDA_VISIBLE_DEVICES: every GPU NVML lists; gpu_indices narrows it to the ordinals given."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=3600, nvml=FakePynvml()) as sampler:
        assert sampler.gpus == [0, 1]
    assert {k for k in sender.metrics() if k.startswith("system/gpu_1_")}
    narrowed = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(narrowed), interval=3600, gpu_indices=[1], nvml=FakePynvml()) as sampler:
        assert sampler.gpus == [1]
    keys = set(narrowed.metrics())
    assert any(k.startswith("system/gpu_1_") for k in keys) and not any(k.startswith("system/gpu_0_") for k in keys)


@pytest.mark.parametrize(
    "env, expected",
    [
        ("0,1", [(0, 0), (1, 1)]),
        ("1,0", [(0, 1), (1, 0)]),
        ("1", [(0, 1)]),
        ("GPU-bbbb2222", [(0, 1)]),  # a UUID prefix, as CUDA accepts
        ("GPU-aaaa1111-0000-0000-0000-000000000000, 1", [(0, 0), (1, 1)]),
        ("0,-1,1", [(0, 0)]),  # CUDA ignores everything from the first invalid entry
        ("0,7,1", [(0, 0)]),
        ("GPU-ffff", []),
        ("", []),
    ],
)
def test_visible_gpus_follow_cuda_visible_devices_rules(env, expected):
    """Indices and UUIDs map to (cuda ordinal, NVML index); the list ends at the first entry naming no GPU."""
    nvml, _ = _Nvml.open(FakePynvml())
    assert [(g.ordinal, g.index) for g in nvml.visible(env)] == expected


def test_no_visible_gpu_warns_once_and_samples_cpu_only(monkeypatch, caplog):
    """NVML works but CUDA_VISIBLE_DEVICES is empty (a Ray actor without GPUs): CPU metrics, one warning."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.WARNING, logger="fl_ray.system_metrics")
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=0.05, nvml=FakePynvml()):
        time.sleep(0.2)
    assert set(sender.metrics()) == CPU_KEYS
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and NO_GPU_WARNING in warnings[0] and "no visible GPU" in warnings[0]


def test_failing_nvml_init_is_reported_in_the_single_warning(caplog):
    """nvmlInit failing (no driver) is the reason the warning gives."""
    caplog.set_level(logging.WARNING, logger="fl_ray.system_metrics")
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=3600, nvml=FakePynvml(init_error="Driver Not Loaded")):
        pass
    assert set(sender.metrics()) == CPU_KEYS
    assert _warnings(caplog) == [
        f"site site-1: no GPU metrics: NVML is not available (Driver Not Loaded); {NO_GPU_WARNING}"
    ]


def test_unsupported_gpu_reading_is_skipped_with_one_warning(monkeypatch, caplog):
    """A reading NVML refuses (power on a board without a sensor) is left out of every sample, warned once."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    caplog.set_level(logging.WARNING, logger="fl_ray.system_metrics")
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=0.05, nvml=FakePynvml(power_unsupported=(0,))) as s:
        time.sleep(0.25)
    assert s.samples >= 3
    keys = set(sender.metrics())
    assert "system/gpu_0_utilization_percentage" in keys and "system/gpu_0_power_usage_watts" not in keys
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "no power for gpu_0" in warnings[0]


def test_lifecycle_stop_takes_a_final_sample_and_is_safe_twice():
    """stop() before the first interval still logs step 0; a second stop() adds nothing; restarting is refused."""
    sender = RecordingSender()
    sampler = SystemMetricsSampler(MLflowWriter(sender), interval=3600, nvml=FakePynvml(init_error="x"))
    sampler.stop()  # before start: nothing to do
    sampler.start()
    sampler.stop()
    sampler.stop()
    assert sampler.samples == 1
    assert {points[0][0] for points in sender.metrics().values()} == {0}
    with pytest.raises(RuntimeError, match="site-1.*stopped.*starts once"):
        sampler.start()


def test_a_failing_writer_stops_sampling_without_raising(caplog):
    """When the writer refuses records (tracking closed), the thread stops and says so once; stop() is quiet."""

    class ClosedSender(RecordingSender):
        def record(self, *args, **kwargs):
            raise RuntimeError("tracking for site 'site-1' is closed")

    caplog.set_level(logging.ERROR, logger="fl_ray.system_metrics")
    sampler = SystemMetricsSampler(MLflowWriter(ClosedSender()), interval=0.02, nvml=FakePynvml(init_error="x"))
    sampler.start()
    time.sleep(0.15)
    sampler.stop()
    assert sampler.samples == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "sampling stopped" in errors[0].getMessage()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"interval": 0}, ["interval", "0", "positive"]),
        ({"interval": float("nan")}, ["interval", "nan"]),
        ({"interval": "10"}, ["interval", "'10'"]),
        ({"gpu_indices": [-1]}, ["gpu_indices", "[-1]", "ordinals"]),
        ({"gpu_indices": ["0"]}, ["gpu_indices", "['0']"]),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, words):
    """Bad interval or gpu_indices raise ValueError naming the argument and the value."""
    with pytest.raises(ValueError) as err:
        SystemMetricsSampler(MLflowWriter(RecordingSender()), **kwargs)
    assert all(w in str(err.value) for w in words)


def test_gpu_indices_not_visible_fail_at_start(monkeypatch):
    """Asking for cuda:3 when only one GPU is visible names the index and what is visible."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    fake = FakePynvml()
    sampler = SystemMetricsSampler(MLflowWriter(RecordingSender()), gpu_indices=[3], nvml=fake)
    with pytest.raises(ValueError, match=r"gpu_indices: \[3\] not among the visible GPUs \[0\]"):
        sampler.start()
    sampler.stop()
    assert fake.open_handles == 0


def test_gpu_description_lists_visible_gpus(monkeypatch):
    """The text names the driver and, per visible GPU, cuda ordinal, NVML index, name, MiB and UUID."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    text = gpu_description(FakePynvml())
    assert "CUDA_VISIBLE_DEVICES: 1" in text
    assert "NVIDIA driver 999.01.02, CUDA 12.4" in text
    assert "cuda:0  GPU 1  Fake GPU B  38146 MiB  GPU-bbbb2222-0000-0000-0000-000000000000" in text
    assert "Fake GPU A" not in text


def test_gpu_description_without_nvml_says_why():
    """Without NVML the text ends in one line saying there is no GPU and why."""
    text = gpu_description(FakePynvml(init_error="NVML Shared Library Not Found"))
    assert text.splitlines()[-1] == "no GPU: NVML is not available (NVML Shared Library Not Found)"
    assert text.startswith("host: ")


@pytest.mark.skipif(not HAS_REAL_GPU, reason="needs NVML and an NVIDIA GPU")
def test_real_gpu_readings_under_load(monkeypatch):
    """On a real GPU (cuda:0 as Ray would expose it): utilization, memory and power readings are plausible."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    sender = RecordingSender()
    with SystemMetricsSampler(MLflowWriter(sender), interval=0.2) as sampler:
        if torch.cuda.is_available():
            a = torch.randn(8192, 8192, device="cuda")
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                (a @ a).sum().item()
        else:
            time.sleep(1.5)
    assert sampler.gpus == [0]
    last = {k: v[-1][1] for k, v in sender.metrics().items()}
    assert GPU0_KEYS - {"system/gpu_0_power_usage_percentage", "system/gpu_0_power_usage_watts"} <= set(last)
    assert 0 <= last["system/gpu_0_utilization_percentage"] <= 100
    assert 0 < last["system/gpu_0_memory_usage_megabytes"] < last["system/gpu_0_memory_total_megabytes"]
    assert last["system/gpu_0_memory_total_megabytes"] > 1000
    if "system/gpu_0_power_usage_watts" in last:
        assert last["system/gpu_0_power_usage_watts"] > 0
    text = gpu_description()
    assert "cuda:0  GPU 0  " in text and "NVIDIA driver" in text


def test_steps_continue_after_the_steps_a_resumed_site_already_has():
    """A site whose system metrics reached step 6 in an earlier life (resume, restart) samples from step 7 on;
    the no-GPU reason is kept in ``no_gpu``, and with warn_no_gpu=False it is not logged."""
    sender = RecordingSender(steps={"system/cpu_utilization_percentage": 7, "system/gpu_0_power_usage_watts": 5})
    with SystemMetricsSampler(
        MLflowWriter(sender), interval=3600, nvml=FakePynvml(init_error="Driver Not Loaded"), warn_no_gpu=False
    ) as sampler:
        pass
    assert "Driver Not Loaded" in sampler.no_gpu
    assert {key: [s for s, _ in points] for key, points in sender.metrics().items()} == {k: [7] for k in CPU_KEYS}
