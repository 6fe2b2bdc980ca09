"""Check a GPU worker end to end: an embedded server, a brain and one worker that owns a GPU,
running a small plan of model work; prints what NVML reads, every GPU state change with its
timing, and each task's metrics, and writes them as JSON.

    .venv/bin/python tools/gpu_check.py --gpu 0 --out gpu-check.json
    .venv/bin/python tools/gpu_check.py --gpu none --kinds embed      # the CPU path

Kinds: embed (sentence-transformers), transcribe (faster-whisper; needs --audio or espeak-ng),
prompt (llama.cpp through llama-cpp-python; the brain loads the LLM on the GPU first), and a
shell task of class script that shows the environment the GPU's worker gives its tasks.
Models come from the registry (the config's [models], else the built-in PyPI models).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.base import run_loop  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history  # noqa: E402
from mesh.events import GpuState, PlanFinished, RunFinished  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.host.planfiles import load_plan  # noqa: E402
from mesh.ops.up import Stack  # noqa: E402

TEXTS = [
    "The GPU in the closet runs all night.",
    "A graphics card computes in parallel.",
    "The cat sleeps on the warm windowsill.",
    "Cats like sleeping in the sun.",
    "Transcription turns speech into text.",
    "Whisper converts audio recordings to words.",
]


def nvml_reading(index: int) -> dict[str, Any]:
    """One NVML sample of a GPU (what the watchdog will sample every few seconds)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        name = pynvml.nvmlDeviceGetName(h)
        out: dict[str, Any] = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _s(pynvml.nvmlSystemGetDriverVersion()),
            "memory_total_mb": mem.total // 2**20,
            "memory_used_mb": mem.used // 2**20,
            "utilization_gpu_pct": util.gpu,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, fn in (
            ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
            ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
            ("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
            ("throttle_reasons", lambda: pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)),
        ):
            try:
                out[key] = fn()
            except pynvml.NVMLError as exc:
                out[key] = f"n/a ({exc})"
        return out
    finally:
        pynvml.nvmlShutdown()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def make_plan(workdir: Path, kinds: list[str], audio: str) -> str:
    texts = workdir / "texts.txt"
    texts.write_text("\n".join(TEXTS * 50) + "\n")
    parts = [
        "# gpu check\n\n## Tasks\n\n### env\n- class: script\n\n```shell\n"
        "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES\n```\n"
    ]
    if "embed" in kinds:
        parts.append(f"### embed\n\n```embed\nfile: {texts}\nsave: {workdir}/vectors.npy\n```\n")
    if "transcribe" in kinds and audio:
        parts.append(f"### transcribe\n\n```transcribe\n{audio}\n```\n")
    if "prompt" in kinds:
        parts.append(
            "### prompt\n- max_tokens: 48\n\n```prompt\n"
            "Q: What is the capital of France?\nA: The capital of France is\n```\n"
        )
    return "\n".join(parts)


async def check(url: str, plan_text: str, workdir: Path, timeout_s: float) -> dict[str, Any]:
    s = load_settings(server=url)
    path = workdir / "check.md"
    path.write_text(plan_text)
    spec = load_plan(path)
    bus = await connect(s, "gpu-check", wait_s=10.0)
    try:
        await bus.ensure_resources()
        began = time.time()
        plan_id = await client.submit(bus, spec)
        status = ""
        while time.time() - began < timeout_s:
            rec = await client.get_plan(bus, plan_id)
            if rec is not None and rec.final:
                status = rec.status
                break
            await asyncio.sleep(0.5)
        report: dict[str, Any] = {
            "plan": plan_id,
            "status": status or "timeout",
            "wall_s": time.time() - began,
        }
        tasks, gpu_states = {}, []
        async for e in read_history(
            bus, [s.names.plan_filter(plan_id), s.names.gpu_states_all], idle_timeout_s=2
        ):
            if isinstance(e.msg, RunFinished):
                tasks[e.msg.task_id] = {
                    "ok": e.msg.ok,
                    "duration_s": round(e.msg.duration_s, 3),
                    "error": e.msg.error,
                    "output": (e.msg.output or e.msg.stdout_tail)[:300],
                    "metrics": e.msg.metrics,
                    "model": e.msg.model,
                    "gpu": e.msg.gpu,
                }
            elif isinstance(e.msg, GpuState):
                m = e.msg
                gpu_states.append(
                    {
                        "state": m.state,
                        "previous": m.previous,
                        "took_s": m.took_s,
                        "llm": m.llm,
                        "script_models": list(m.script_models),
                        "vram_used_mb": m.vram_used_mb,
                        "vram_total_mb": m.vram_total_mb,
                        "device": m.device,
                        "name": m.name,
                        "error": m.error,
                    }
                )
            elif isinstance(e.msg, PlanFinished):
                report["counts"] = e.msg.counts
        report["tasks"] = tasks
        report["gpu_states"] = gpu_states
        return report
    finally:
        await bus.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="0", help="GPU index, or 'none' for the CPU")
    ap.add_argument("--kinds", default="embed,transcribe,prompt")
    ap.add_argument("--audio", default="", help="a WAV file to transcribe (default: made with espeak-ng)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", help="write the report here too")
    args = ap.parse_args()
    gpu = None if args.gpu in ("none", "cpu") else int(args.gpu)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    report: dict[str, Any] = {}
    if gpu is not None:
        report["nvml_before"] = nvml_reading(gpu)
    with tempfile.TemporaryDirectory(prefix="mesh-gpu-check-") as tmp:
        work = Path(tmp)
        audio = args.audio
        if "transcribe" in kinds and not audio and shutil.which("espeak-ng"):
            audio = str(work / "hello.wav")
            subprocess.run(
                ["espeak-ng", "-s", "130", "-w", audio, "hello world, the graphics card is working"],
                check=True,
            )
        # short keep-alive and residency so the check also sees the LLM unloaded
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_") or k == "MESH_CONFIG"}
        env.update({"MESH_LOG_LEVEL": "INFO", "MESH_KEEP_ALIVE_S": "5", "MESH_MIN_RESIDENCY_S": "1"})
        stack = Stack(
            tmp, -1, 0, 1, log_dir=str(work / "logs"), env=env, auditor=False, gpus=(gpu,), watchdog=False
        )
        stack.start()
        try:
            report.update(run_loop(check(stack.url, make_plan(work, kinds, audio), work, args.timeout)))
            if report.get("status") == "timeout":
                # where each agent waits (its threads' stacks go to its log), or how it died
                for child in stack.children:
                    assert child.proc is not None
                    if child.alive():
                        os.kill(child.proc.pid, signal.SIGUSR1)
                    else:
                        report.setdefault("exited", {})[child.name] = child.proc.returncode
                time.sleep(1)
            if gpu is not None:
                report["nvml_after"] = nvml_reading(gpu)
            time.sleep(8)  # past the keep-alive: the unload shows in the states
            report["gpu_states_after_keep_alive"] = run_loop(_states(stack.url))
        finally:
            stack.stop()
            logs = work / "logs"
            report["worker_log_tail"] = [
                line
                for p in sorted(logs.glob("*.log"))
                for line in p.read_text().splitlines()[-(15 if report.get("status") != "timeout" else 200) :]
            ]
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report.get("status") == "succeeded" else 1


async def _states(url: str) -> list[str]:
    s = load_settings(server=url)
    bus = await connect(s, "gpu-check", wait_s=10.0)
    try:
        return [
            f"{e.msg.previous}->{e.msg.state} ({e.msg.took_s}s) llm={e.msg.llm}"
            async for e in read_history(bus, s.names.gpu_states_all, idle_timeout_s=2)
            if isinstance(e.msg, GpuState)
        ]
    finally:
        await bus.close()


if __name__ == "__main__":
    raise SystemExit(main())
