#!/usr/bin/env python3
"""The Python baseline of `scripts/bench sampler`: a GPU energy sampler written the way Python GPU
agents sample today, with pynvml (the `nvidia-ml-py` package): every period, for every GPU,
nvmlDeviceGetTotalEnergyConsumption and nvmlDeviceGetPowerUsage, energy accumulated from counter
deltas. It ticks at absolute time.monotonic() deadlines (skipping deadlines already past, like
ergond) and reports the CPU time it used per GPU sample as one JSON object on stdout.

pynvml loads libnvidia-ml.so.1 through the dynamic loader: the benchmark points LD_LIBRARY_PATH
at the directory holding the fake library under that name.
"""
import argparse
import json
import resource
import time

import pynvml


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--period-ms", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    a = p.parse_args()

    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    assert count == a.gpus, f"NVML lists {count} GPUs, expected {a.gpus}"
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    last = [None] * count
    energy_j = [0.0] * count
    power_w = [0.0] * count
    period = a.period_ms / 1000.0

    def tick():
        for i, h in enumerate(handles):
            e = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            power_w[i] = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            if last[i] is not None and e >= last[i]:
                energy_j[i] += (e - last[i]) / 1000.0
            last[i] = e

    def run(seconds):
        ticks = missed = 0
        lateness = []
        start = time.monotonic()
        k = 0
        while True:
            deadline = start + k * period
            now = time.monotonic()
            if deadline - start >= seconds:
                break
            if deadline > now:
                time.sleep(deadline - now)
            lateness.append(time.monotonic() - deadline)
            tick()
            ticks += 1
            nxt = int((time.monotonic() - start) / period) + 1
            missed += max(0, nxt - (k + 1))
            k = max(nxt, k + 1)
        return ticks, missed, lateness, time.monotonic() - start

    run(a.warmup)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    th0 = time.thread_time_ns()
    ticks, missed, lateness, elapsed = run(a.seconds)
    th1 = time.thread_time_ns()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    pynvml.nvmlShutdown()
    proc_ns = ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) * 1e9
    lateness.sort()

    def pct(p):
        return lateness[min(len(lateness) - 1, max(0, int(p / 100 * len(lateness) + 0.999999) - 1))]

    samples = ticks * count
    print(json.dumps({
        "pynvml_version": getattr(pynvml, "__version__", None) or "nvidia-ml-py",
        "period_ms": a.period_ms,
        "seconds": elapsed,
        "gpus": count,
        "ticks": ticks,
        "missed_ticks": missed,
        "achieved_hz": ticks / elapsed,
        "gpu_samples": samples,
        "thread_cpu_ns": th1 - th0,
        "process_cpu_ns": proc_ns,
        "thread_cpu_ns_per_gpu_sample": (th1 - th0) / max(1, samples),
        "process_cpu_ns_per_gpu_sample": proc_ns / max(1, samples),
        "process_core_pct": proc_ns / (elapsed * 1e9) * 100,
        "lateness_p50_us": pct(50) * 1e6,
        "lateness_p99_us": pct(99) * 1e6,
        "energy_j": sum(energy_j),
    }))


if __name__ == "__main__":
    main()
